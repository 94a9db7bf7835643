"""The runs a verification compares: prompts as a padded batch, cached prefill in chunks, the original
transformers model with the same weights, and the tolerances each comparison is held to."""

from __future__ import annotations

import inspect

import torch
from transformers import AutoModelForCausalLM

DEFAULT_PROMPTS = (
    "The quick brown fox jumps over the lazy dog.",
    "KV caches store keys and values",
    "1 2 3 4 5",
)

# Max abs logit error accepted per dtype, by kind of comparison. float32 values were set from the largest
# error observed on correct runs over all zoo families (README, "Tolerances"), with margin.
TOLERANCES = {
    torch.float32: {"cache": 1e-4, "original": 1e-5},
    torch.bfloat16: {"cache": 2.5e-1, "original": 2.5e-1},
    torch.float16: {"cache": 5e-2, "original": 5e-2},
}
CHUNK_SIZES = (2, 3, 5)
ATTENTION_IMPLEMENTATIONS = ("eager", "sdpa")


def batch(model, prompts):
    enc = model.tokenizer(list(prompts), padding=True, return_tensors="pt")
    return enc["input_ids"].to(model.device), enc["attention_mask"].to(model.device)


def cached_in_chunks(model, input_ids, attention_mask, chunk: int) -> torch.Tensor:
    cache = model.new_cache()
    pieces = []
    for start in range(0, input_ids.shape[1], chunk):
        end = min(start + chunk, input_ids.shape[1])
        out = model(input_ids[:, start:end], attention_mask=attention_mask[:, :end], past_key_values=cache,
                    use_cache=True)
        pieces.append(out.logits)
    return torch.cat(pieces, dim=1)


def extend_mask(attention_mask: torch.Tensor, total_length: int) -> torch.Tensor:
    """The prompt's mask followed by ones for the generated slots, `[b, total_length]`."""
    extra = total_length - attention_mask.shape[1]
    return torch.cat([attention_mask, attention_mask.new_ones(attention_mask.shape[0], extra)], dim=1)


def padding_aware_position_ids(attention_mask: torch.Tensor) -> torch.Tensor:
    """Position ids as transformers' `generate` makes them: count real tokens, padding at 0."""
    return (attention_mask.cumsum(-1) - 1).clamp(min=0)


def unwrapped_copy(model, attn_implementation: str):
    """The original transformers model with the same weights, under the given attention implementation."""
    config = type(model.config).from_dict(model.config.to_dict())
    reference = AutoModelForCausalLM.from_config(config, attn_implementation=attn_implementation, dtype=model.dtype)
    reference.load_state_dict(model.hf_model.state_dict())
    return reference.to(model.device).eval()


def original_logits(reference, input_ids, attention_mask) -> torch.Tensor:
    """An unwrapped transformers model called as `generate` calls it (padding-aware position ids)."""
    kwargs = {}
    if "position_ids" in inspect.signature(reference.forward).parameters:
        kwargs["position_ids"] = padding_aware_position_ids(attention_mask)
    return reference(input_ids, attention_mask=attention_mask, **kwargs).logits


