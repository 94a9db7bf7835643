"""transformers' own cache classes and attention implementations, checked as a user would run them: the
original model (no hooks of this library inside), a greedy loop that passes the cache, and
`verify_decode_loop` watching from outside. Whatever departs here is transformers' finding, not this
library's: rows are marked `upstream` and name the first divergent layer and step.

    dynamic     DynamicCache
    static      StaticCache sized to prompt + new tokens
    offloaded   DynamicCache(offloading=True): layers parked on the CPU between uses (needs a GPU)
    sliding     DynamicCache on a config with a sliding window (the model's own, or the one given)
    quantized   QuantizedCache, the first installed backend of quanto, hqq, fp8 (lossy by design)
"""

from __future__ import annotations

import importlib.util

import torch
from transformers import DynamicCache, QuantizedCache, StaticCache

from interp_cache.verify.decode_loop import verify_decode_loop
from interp_cache.verify.report import CheckRow, VerifyReport, skipped_row
from interp_cache.verify.runs import padding_aware_position_ids, prompt_batch, unwrapped_copy

QUANTIZED_BACKENDS = (("quanto", "optimum"), ("hqq", "hqq"), ("fp8", None))  # (backend, module it needs)


def _quantized_backend() -> str:
    return next(backend for backend, module in QUANTIZED_BACKENDS
                if module is None or importlib.util.find_spec(module) is not None)


class _NotApplicable(Exception):
    """This cache class cannot run here (the note says why): the row is skipped, neither passed nor failed."""


def _sliding(config) -> DynamicCache:
    cache = DynamicCache(config=config)
    if not any("Sliding" in type(layer).__name__ for layer in cache.layers):
        raise _NotApplicable("the model's config has no sliding-window layers (sliding_window unset or disabled)")
    return cache


def _offloaded(config) -> DynamicCache:
    if not torch.cuda.is_available():
        raise _NotApplicable("offloading moves layers between a GPU and the CPU; no GPU here")
    return DynamicCache(config=config, offloading=True)


CACHE_CLASSES = {
    "dynamic": lambda config, length: DynamicCache(config=config),
    "static": lambda config, length: StaticCache(config=config, max_cache_len=length),
    "offloaded": lambda config, length: _offloaded(config),
    "sliding": lambda config, length: _sliding(config),
    "quantized": lambda config, length: QuantizedCache(_quantized_backend(), config=config),
}
LOSSY = {"quantized"}


def cache_greedy_loop(cache_name: str):
    """A correct hand-written greedy loop over transformers' `cache_name` cache class."""

    def loop(model, input_ids, attention_mask, max_new_tokens):
        try:
            cache = CACHE_CLASSES[cache_name](model.config, input_ids.shape[1] + max_new_tokens)
        except ValueError as refusal:  # e.g. QuantizedCache on a model with sliding-window layers
            raise _NotApplicable(f"transformers refuses it: {refusal}") from refusal
        positions = padding_aware_position_ids(attention_mask)
        out = model(input_ids, attention_mask=attention_mask, position_ids=positions, past_key_values=cache,
                    use_cache=True)
        mask, last = attention_mask, positions[:, -1:]
        for _ in range(max_new_tokens - 1):
            token = out.logits[:, -1].argmax(-1, keepdim=True)
            mask = torch.cat([mask, mask.new_ones(mask.shape[0], 1)], dim=1)
            last = last + 1
            out = model(token, attention_mask=mask, position_ids=last, past_key_values=cache, use_cache=True)

    return loop


def verify_cache_class(model, cache: str, attn_implementation: str = "sdpa", prompts=None,
                       max_new_tokens: int = 8, name: str | None = None) -> VerifyReport:
    """Does transformers' `cache` class, under `attn_implementation`, decode as the uncached forward does on
    `model`'s weights? `model`: a HookedModel (its original transformers model is rebuilt unwrapped)."""
    if cache not in CACHE_CLASSES:
        raise ValueError(f"unknown cache class {cache!r}; accepted: {', '.join(CACHE_CLASSES)}")
    check = f"{cache} cache, {attn_implementation}"
    label = f"{name or model.family} (transformers)"
    report = VerifyReport(label, str(model.dtype).replace("torch.", ""))
    try:
        original = unwrapped_copy(model, attn_implementation)
    except ValueError as error:  # transformers refuses the implementation for this architecture
        report.rows.append(skipped_row(check, str(error).split(". ")[0]))
        return report
    input_ids, attention_mask = prompt_batch(model, prompts)
    try:
        loop_report = verify_decode_loop(original, cache_greedy_loop(cache), input_ids, max_new_tokens,
                                         attention_mask=attention_mask)
    except _NotApplicable as reason:
        report.rows.append(skipped_row(check, str(reason)))
        return report
    except Exception as error:  # the loop is a correct one: an error inside transformers is its finding
        message = str(error).splitlines()[0][:200]
        report.rows.append(CheckRow(check, False, None, None, None, upstream=True,
                                    note=f"transformers raised {type(error).__name__}: {message}"))
        return report
    row = loop_report.rows[0]
    row.check = check
    if not row.passed:
        row.upstream = True
        cause = (f"lossy by design ({_quantized_backend()} backend)" if cache in LOSSY
                 else "transformers' own cache and attention depart from its uncached forward")
        row.note = f"{cause}: {row.note}"
    report.rows.append(row)
    return report
