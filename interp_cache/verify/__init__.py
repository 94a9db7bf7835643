"""Does cached decoding compute the same function as the uncached forward? And if not, where does it part?

    checks.py       `verify(model)`: one row per check (stepwise, chunked, left padding, generate, original,
                    no-op hooks, compression identity)
    decode_loop.py  `verify_decode_loop(model, loop_fn)`: a user's own decode loop, on a HookedModel or a
                    plain transformers model
    plain_loop.py   ... on a plain model: the first (step, layer) that departs, with what the loop passed
    module_probe.py module hooks on a plain model's decoder layers, attention and inputs
    cache_classes.py  `verify_cache_class`: transformers' own cache classes under a correct loop
    localize.py     the first divergent hook call (layer, head, step, absolute position)
    runs.py         prompts, chunked prefill, the original model, tolerances
    report.py       rows, reports, and their table / Markdown / JSON forms
"""

from interp_cache.verify.cache_classes import CACHE_CLASSES, verify_cache_class
from interp_cache.verify.checks import verify
from interp_cache.verify.decode_loop import verify_decode_loop
from interp_cache.verify.localize import first_divergence, localize
from interp_cache.verify.report import (
    CheckRow,
    Divergence,
    VerifyReport,
    format_markdown,
    format_table,
    write_json,
)
from interp_cache.verify.runs import TOLERANCES, original_logits

__all__ = [
    "CACHE_CLASSES",
    "TOLERANCES",
    "CheckRow",
    "Divergence",
    "VerifyReport",
    "first_divergence",
    "format_markdown",
    "format_table",
    "localize",
    "original_logits",
    "verify",
    "verify_cache_class",
    "verify_decode_loop",
    "write_json",
]
