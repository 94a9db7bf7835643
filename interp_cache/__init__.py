"""interp_cache: record, patch, compress and verify cached decoding of Hugging Face causal LMs."""

from interp_cache.adapters import SUPPORTED_FAMILIES, UnsupportedArchitectureError
from interp_cache.cache import HookedCache, HookedCacheLayer
from interp_cache.hook_points import HookShapeError
from interp_cache.hooked_model import HookedModel
from interp_cache.loading import load
from interp_cache.zoo import ZOO

__all__ = [
    "HookedCache",
    "HookedCacheLayer",
    "HookedModel",
    "HookShapeError",
    "SUPPORTED_FAMILIES",
    "UnsupportedArchitectureError",
    "ZOO",
    "load",
]
