"""The family registry: every module of this package that declares `FAMILIES` contributes its families.

Read, not kept: a new family is one adapter file with its `FAMILIES` list (adapter, model_type, zoo config),
found here by scanning the package. `family_of(config)` picks the one family that serves a transformers
config; an unsupported architecture is an error that lists the supported families.
"""

from __future__ import annotations

import importlib
import pkgutil
from functools import cache

import interp_cache.adapters as adapters_package
from interp_cache.adapters.attention_interface import AttentionInterfaceAdapter, supports_interface
from interp_cache.adapters.base import Family


class UnsupportedArchitectureError(ValueError):
    pass


def _encoding_rank(family: Family) -> int:
    adapter = family.adapter
    return 0 if adapter.learned_positions else 2 if adapter.alibi else 1


@cache
def families() -> dict[str, Family]:
    """Every supported family by name: learned positions, then rotary, then ALiBi; within each, by module."""
    found: dict[str, Family] = {}
    for module_info in sorted(pkgutil.iter_modules(adapters_package.__path__), key=lambda m: m.name):
        module = importlib.import_module(f"{adapters_package.__name__}.{module_info.name}")
        for family in getattr(module, "FAMILIES", ()):
            if family.name in found:
                raise RuntimeError(f"family {family.name!r} is declared twice (in {module.__name__} and before)")
            found[family.name] = family
    return {family.name: family for family in sorted(found.values(), key=_encoding_rank)}


def supported_families() -> tuple[str, ...]:
    return tuple(families())


GENERIC_PATH = "any other decoder whose attention calls transformers' attention interface (generic path)"


def family_for(config) -> Family:
    """The one family that serves a transformers config: a declared one, else the generic path where the
    config's causal-LM class uses transformers' attention interface; anything else is an error."""
    serving = [family for family in families().values() if family.serves(config)]
    if len(serving) == 1:
        return serving[0]
    model_type = getattr(config, "model_type", None)
    if not serving and model_type and supports_interface(config):
        return Family(model_type, AttentionInterfaceAdapter(model_type), model_type, None, "generic path, undeclared")
    raise UnsupportedArchitectureError(
        f"model_type {model_type!r} ({type(config).__name__}) is not supported; "
        f"supported families: {', '.join(supported_families())}, and {GENERIC_PATH}"
    )


def family_of(config) -> str:
    """The family name for a transformers config (Falcon with ALiBi is its own family); a model type without an
    adapter file is served by the generic path where its attention uses transformers' attention interface."""
    return family_for(config).name
