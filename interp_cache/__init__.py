"""interp_cache: record, patch, compress and verify cached decoding of Hugging Face causal LMs."""

from interp_cache.adapters import SUPPORTED_FAMILIES, UnsupportedArchitectureError
from interp_cache.cache.hooked_cache import HookedCache, HookedCacheLayer
from interp_cache.core.hook_points import HookShapeError
from interp_cache.models.hooked_model import HookedModel
from interp_cache.models.loading import load
from interp_cache.analysis.patching import MissingSourceError, add, at, from_source, replace_with, scale, zero
from interp_cache.analysis.recording import Recording, RecordingFileError
from interp_cache.decoding.stepper import Stepper
from interp_cache.analysis.sweep import SweepResult, logit_diff, sweep
from interp_cache.models.zoo import ZOO

__all__ = [
    "HookedCache",
    "HookedCacheLayer",
    "HookedModel",
    "HookShapeError",
    "MissingSourceError",
    "Recording",
    "RecordingFileError",
    "Stepper",
    "SweepResult",
    "SUPPORTED_FAMILIES",
    "UnsupportedArchitectureError",
    "ZOO",
    "add",
    "at",
    "from_source",
    "load",
    "logit_diff",
    "replace_with",
    "scale",
    "sweep",
    "zero",
]
