"""Policies from a one-line spec, for the command line: `name:key=value,key=value`.

    parse_policy("snapkv:budget=64,window=8")     -> SnapKV(budget=64, window=8)
    parse_policy("adakv:budget=64,alpha=0.2")     -> AdaKV(SnapKV(budget=64), alpha=0.2)
    parse_policy("adakv:base=pyramidkv,budget=64") -> AdaKV(PyramidKV(budget=64))
    parse_policy("quest:budget=0.25,page_size=16") -> Quest(budget=0.25, page_size=16)

Names are those of the policy registry. Values are read as `true` / `false`, int, then float, else kept as
text. A policy
that builds on another (AdaKV) takes `base=NAME` (default: the base its dataclass defaults to) and its own
parameters; every other key goes to its base.
"""

from __future__ import annotations

from dataclasses import MISSING, fields

from interp_cache.compress.registry import policy_class


def _value(text: str):
    if text in ("true", "false"):
        return text == "true"
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return text


def _build(name: str, params: dict):
    cls = policy_class(name)
    accepted = {f.name for f in fields(cls)}
    unknown = set(params) - accepted
    if unknown:
        raise ValueError(f"{name} has no parameter {', '.join(sorted(unknown))}; accepted: {', '.join(sorted(accepted))}")
    return cls(**params)


def _default_base_name(cls) -> str:
    wrapped = next(f for f in fields(cls) if f.name == cls.wraps)
    default = wrapped.default_factory() if wrapped.default_factory is not MISSING else wrapped.default
    return type(default).spec_name


def parse_policy(spec: str):
    if not isinstance(spec, str):
        raise TypeError(f"a compression spec is text like 'snapkv:budget=64'; got {type(spec).__name__}")
    name, _, rest = spec.partition(":")
    params = {}
    for item in filter(None, rest.split(",")):
        key, sep, value = item.partition("=")
        if not sep:
            raise ValueError(f"compression spec items are key=value; got {item!r} in {spec!r}")
        params[key.strip()] = _value(value.strip())
    cls = policy_class(name)
    if cls.wraps is None:
        return _build(name, params)
    base_name = str(params.pop(cls.wraps, _default_base_name(cls)))
    if policy_class(base_name).wraps is not None:
        raise ValueError(f"{name} base cannot be {base_name}: it builds on another policy itself")
    own = {f.name for f in fields(cls)} - {cls.wraps}
    own_params = {key: params.pop(key) for key in sorted(own) if key in params}
    return cls(**{cls.wraps: _build(base_name, params)}, **own_params)
