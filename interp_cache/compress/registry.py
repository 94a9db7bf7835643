"""The policy registry: every compression policy class registers itself under its spec name when defined.

    class SnapKV(EvictionPolicy, name="snapkv"): ...

The spec parser, error messages, AdaKV's choice of bases and the verifier's identity row read this
registry, so a new policy -- one file in this package, or a class defined anywhere -- is found by all of
them without a list kept by hand. `interp_cache.compress` imports every module of the package, so its
own policies are registered on import.
"""

from __future__ import annotations

_POLICIES: dict[str, type] = {}


def register(name: str, policy_class: type) -> None:
    if not isinstance(name, str) or not name or name != name.lower() or ":" in name or "," in name:
        raise ValueError(f"a policy name is lower-case text without ':' or ','; got {name!r}")
    if name in _POLICIES and _POLICIES[name] is not policy_class:
        raise ValueError(f"policy name {name!r} is taken by {_POLICIES[name].__qualname__}")
    _POLICIES[name] = policy_class


def unregister(name: str) -> None:
    """Remove a policy (e.g. one a test defined); unknown names raise."""
    if name not in _POLICIES:
        raise KeyError(f"no registered policy {name!r}; registered: {', '.join(policy_names())}")
    del _POLICIES[name]


def policy_names() -> list[str]:
    """Every registered name, alphabetically."""
    return sorted(_POLICIES)


def policy_classes() -> list[type]:
    """Every registered class, in the order of `policy_names`."""
    return [_POLICIES[name] for name in policy_names()]


def policy_class(name: str) -> type:
    """The class registered as `name` (case-insensitive); an unknown name lists the accepted ones."""
    found = _POLICIES.get(name.lower())
    if found is None:
        raise ValueError(f"unknown compression policy {name!r}; accepted: {', '.join(policy_names())}")
    return found
