"""interp_cache: record, patch, compress and verify cached decoding of Hugging Face causal LMs.

The subpackages follow the data flow: `core` (hook points, forward context, the attention core, rotary),
`cache` (storage, per-forward lifecycle, editing), `compress` (one file per policy), `adapters` (one file
per family), `models` (the hooked model, loading, the zoo, the tokenizer), `decoding` (generate, Stepper),
`analysis` (recording, alignment, patching, sweeps, pictures), `verify` (checks, localization, reports).
"""

from interp_cache.adapters.registry import (
    UnsupportedArchitectureError,
    supported_families,
)
from interp_cache.analysis.patching import (
    MissingSourceError,
    add,
    at,
    from_source,
    replace_with,
    scale,
    zero,
)
from interp_cache.analysis.recording import Recording
from interp_cache.analysis.recording_files import RecordingFileError
from interp_cache.analysis.sweep import SweepResult, logit_diff, sweep
from interp_cache.cache.hooked_cache import HookedCache
from interp_cache.cache.layer import HookedCacheLayer
from interp_cache.core.hook_points import HookShapeError, NonFiniteHookOutput
from interp_cache.decoding.stepper import Stepper
from interp_cache.models.hooked_model import HookedModel
from interp_cache.models.loading import load
from interp_cache.models.tokenizer import ByteTokenizer
from interp_cache.models.zoo import ZOO
from interp_cache.verify import verify_decode_loop

SUPPORTED_FAMILIES: tuple[str, ...] = supported_families()

__all__ = [
    "SUPPORTED_FAMILIES",
    "ZOO",
    "ByteTokenizer",
    "HookShapeError",
    "NonFiniteHookOutput",
    "HookedCache",
    "HookedCacheLayer",
    "HookedModel",
    "MissingSourceError",
    "Recording",
    "RecordingFileError",
    "Stepper",
    "SweepResult",
    "UnsupportedArchitectureError",
    "add",
    "at",
    "from_source",
    "load",
    "logit_diff",
    "replace_with",
    "scale",
    "sweep",
    "verify_decode_loop",
    "zero",
]
