"""`generate`: transformers' own generation loop and logits processors, run over a HookedCache.

Greedy, sampling (temperature / top-k / top-p), repetition penalty, eos and stop strings,
`num_return_sequences` and beam search (the cache reordered through `HookedCache.reorder_cache`) are
transformers' code; `compress=policy` decodes over a cache compressed by that policy. This module checks
the arguments it is handed, supplies the cache and tokenizer, and nothing else.
"""

from __future__ import annotations

from typing import Any

import torch
from transformers.generation.utils import GenerateDecoderOnlyOutput

from interp_cache.cache.hooked_cache import HookedCache


def validate_generation_kwargs(input_ids: torch.Tensor, kwargs: dict[str, Any]) -> None:
    if not isinstance(input_ids, torch.Tensor) or input_ids.ndim != 2:
        raise ValueError("input_ids must be a 2D LongTensor [batch, prompt_length]")
    if input_ids.shape[0] == 0 or input_ids.shape[1] == 0:
        raise ValueError(f"empty prompt: input_ids has shape {tuple(input_ids.shape)}; need >= 1 row and >= 1 token")
    max_new_tokens = kwargs.get("max_new_tokens")
    if max_new_tokens is not None and (not isinstance(max_new_tokens, int) or max_new_tokens < 0):
        raise ValueError(f"max_new_tokens must be an integer >= 0; got {max_new_tokens!r}")
    top_p = kwargs.get("top_p")
    if top_p is not None and not (0.0 < top_p <= 1.0):
        raise ValueError(f"top_p must be in (0, 1]; got {top_p!r}")
    top_k = kwargs.get("top_k")
    if top_k is not None and (not isinstance(top_k, int) or top_k < 0):
        raise ValueError(f"top_k must be an integer >= 0 (0 disables it); got {top_k!r}")
    temperature = kwargs.get("temperature")
    if temperature is not None and not temperature > 0:
        raise ValueError(f"temperature must be > 0; got {temperature!r}")
    repetition_penalty = kwargs.get("repetition_penalty")
    if repetition_penalty is not None and not repetition_penalty > 0:
        raise ValueError(f"repetition_penalty must be > 0 (1.0 disables it); got {repetition_penalty!r}")
    for name in ("num_beams", "num_return_sequences"):
        value = kwargs.get(name)
        if value is not None and (not isinstance(value, int) or value < 1):
            raise ValueError(f"{name} must be an integer >= 1; got {value!r}")


def _check_reused_cache(cache, input_ids: torch.Tensor) -> None:
    """A cache that already ran continues a sequence as transformers does: `input_ids` is the whole sequence
    (what the cache holds, then the new tokens) and the batch is the one the cache was filled with."""
    if not isinstance(cache, HookedCache) or cache.forward_count == 0:
        return
    rows = cache.layers[0].keys.shape[0]
    if input_ids.shape[0] != rows:
        raise ValueError(
            f"this cache was filled with a batch of {rows} rows; input_ids has {input_ids.shape[0]}: continue "
            "with the same batch, or start from a fresh cache (model.new_cache())"
        )
    held = cache.logical_length
    if input_ids.shape[1] <= held:
        raise ValueError(
            f"this cache already holds {held} token slots; as in transformers, a continuation passes the whole "
            f"sequence -- those {held} slots, then the new tokens (e.g. the previous output's sequences) -- with "
            f"an attention mask over all of it; input_ids has {input_ids.shape[1]}. Or start from a fresh cache."
        )


def generate(
    model,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
    **kwargs: Any,
):
    """Token ids `[batch * num_return_sequences, prompt + new]`, prompt included, as transformers returns."""
    validate_generation_kwargs(input_ids, kwargs)
    _check_reused_cache(kwargs.get("past_key_values"), input_ids)
    if kwargs.get("max_new_tokens") == 0:
        if kwargs.get("return_dict_in_generate"):
            return GenerateDecoderOnlyOutput(sequences=input_ids.clone(), past_key_values=kwargs.get("past_key_values"))
        return input_ids.clone()
    if attention_mask is None:
        attention_mask = torch.ones_like(input_ids)
    tokenizer = model.tokenizer
    if tokenizer is not None:
        kwargs.setdefault("pad_token_id", tokenizer.pad_token_id)
        if kwargs.get("stop_strings") is not None:
            kwargs.setdefault("tokenizer", tokenizer)
    use_cache = kwargs.pop("use_cache", True)
    compress = kwargs.pop("compress", None)
    if compress is not None:
        if not use_cache:
            raise ValueError("compress= needs the KV cache; it cannot be combined with use_cache=False")
        if kwargs.get("past_key_values") is not None:
            raise ValueError(
                "pass either compress= or past_key_values=, not both (a cache carries its policy: "
                "model.new_cache(compress=...))"
            )
    if use_cache and kwargs.get("past_key_values") is None:
        kwargs["past_key_values"] = model.new_cache(compress=compress)
    with torch.no_grad():
        return model.hf_model.generate(input_ids, attention_mask=attention_mask, use_cache=use_cache, **kwargs)
