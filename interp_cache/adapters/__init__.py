"""Family adapters: one per family that needs one; `adapter_for(config)` picks it.

Each entry names the module that defines the adapter object, imported on first use.
"""

from __future__ import annotations

import importlib

from interp_cache.adapters.base import AttentionLayerRunner, FamilyAdapter

_ADAPTERS: dict[str, tuple[str, str]] = {
    "gpt2": ("interp_cache.adapters.gpt2", "GPT2"),
    "opt": ("interp_cache.adapters.opt", "OPT"),
    "gpt_neox": ("interp_cache.adapters.gpt_neox", "GPT_NEOX"),
    "gptj": ("interp_cache.adapters.gptj", "GPTJ"),
    "llama": ("interp_cache.adapters.rotary_interface", "LLAMA"),
    "mistral": ("interp_cache.adapters.rotary_interface", "MISTRAL"),
    "qwen2": ("interp_cache.adapters.rotary_interface", "QWEN2"),
    "qwen3": ("interp_cache.adapters.rotary_interface", "QWEN3"),
    "gemma2": ("interp_cache.adapters.rotary_interface", "GEMMA2"),
    "phi": ("interp_cache.adapters.rotary_interface", "PHI"),
    "bloom": ("interp_cache.adapters.bloom", "BLOOM"),
    "falcon": ("interp_cache.adapters.falcon", "FALCON"),
    "falcon_alibi": ("interp_cache.adapters.falcon", "FALCON_ALIBI"),
    "mpt": ("interp_cache.adapters.mpt", "MPT"),
}

SUPPORTED_FAMILIES: tuple[str, ...] = tuple(_ADAPTERS)


class UnsupportedArchitectureError(ValueError):
    pass


def adapter_by_family(family: str) -> FamilyAdapter:
    if family not in _ADAPTERS:
        raise UnsupportedArchitectureError(
            f"unknown family {family!r}; supported families: {', '.join(SUPPORTED_FAMILIES)}"
        )
    module_name, attribute = _ADAPTERS[family]
    return getattr(importlib.import_module(module_name), attribute)


def family_of(config) -> str:
    """The family name for a transformers config (Falcon with ALiBi is its own family)."""
    model_type = getattr(config, "model_type", None)
    if model_type == "falcon":
        return "falcon_alibi" if getattr(config, "alibi", False) else "falcon"
    if model_type in _ADAPTERS:
        return model_type
    raise UnsupportedArchitectureError(
        f"model_type {model_type!r} ({type(config).__name__}) is not supported; "
        f"supported families: {', '.join(SUPPORTED_FAMILIES)}"
    )


def adapter_for(config) -> FamilyAdapter:
    return adapter_by_family(family_of(config))


__all__ = [
    "AttentionLayerRunner",
    "FamilyAdapter",
    "SUPPORTED_FAMILIES",
    "UnsupportedArchitectureError",
    "adapter_by_family",
    "adapter_for",
    "family_of",
]
