"""The runs a verification compares: prompts as a padded batch, cached prefill in chunks, the original
transformers model with the same weights, and the tolerances each comparison is held to."""

from __future__ import annotations

import inspect
from collections.abc import Mapping

import torch
from accelerate.utils.modeling import get_state_dict_offloaded_model
from transformers import AutoModelForCausalLM

DEFAULT_PROMPTS = (
    "The quick brown fox jumps over the lazy dog.",
    "KV caches store keys and values",
    "1 2 3 4 5",
)

# Max abs logit error accepted per dtype, by kind of comparison, for logits of size `report.LOGIT_SCALE`
# (larger logits scale it up). float32 values were set from the largest error observed on correct runs over
# all zoo families and the trained zoo:needle (README, "Tolerances"), with margin: transformers' own eager
# and SDPA paths differ by 7.6e-5 on zoo:needle (relative 3.9e-6), so "original" is no tighter than "cache".
TOLERANCES = {
    torch.float32: {"cache": 1e-4, "original": 1e-4},
    torch.bfloat16: {"cache": 2.5e-1, "original": 2.5e-1},
    torch.float16: {"cache": 5e-2, "original": 5e-2},
}
CHUNK_SIZES = (2, 3, 5)
ATTENTION_IMPLEMENTATIONS = ("eager", "sdpa")


PROMPT_KINDS = (
    "a string, a list of strings, a BatchEncoding or dict with 'input_ids' (and optionally 'attention_mask'), "
    "or an input_ids tensor [batch, tokens] with an optional attention_mask="
)


def prompt_batch(model, prompts, attention_mask=None) -> tuple[torch.Tensor, torch.Tensor]:
    """`(input_ids, attention_mask)` on the model's device from any accepted kind of prompts (None: the
    defaults). A batch of ids must be left-padded, as the model's tokenizer pads: verification compares
    each row's last tokens."""
    if prompts is None:
        prompts = DEFAULT_PROMPTS
    if isinstance(prompts, str):
        prompts = [prompts]
    if isinstance(prompts, Mapping):
        if "input_ids" not in prompts:
            raise TypeError(f"a dict of prompts needs 'input_ids'; got keys {sorted(prompts)}; accepted: {PROMPT_KINDS}")
        if attention_mask is not None:
            raise TypeError("pass the attention mask inside the dict or as attention_mask=, not both")
        ids, mask = (_as_tensor(prompts.get(key), key) for key in ("input_ids", "attention_mask"))
        return _checked_ids(model, ids, mask)
    if isinstance(prompts, torch.Tensor):
        return _checked_ids(model, prompts, attention_mask)
    if attention_mask is not None:
        raise TypeError("attention_mask= goes with an input_ids tensor, not with text prompts")
    if isinstance(prompts, (list, tuple)) and prompts and all(isinstance(p, str) and p for p in prompts):
        if getattr(model, "tokenizer", None) is None:
            raise ValueError("text prompts need a model with a tokenizer (a HookedModel with model.tokenizer set); "
                             "pass input_ids")
        enc = model.tokenizer(list(prompts), padding=True, return_tensors="pt")
        return enc["input_ids"].to(model.device), enc["attention_mask"].to(model.device)
    raise TypeError(f"prompts must be {PROMPT_KINDS}; got {_describe(prompts)}")


def _as_tensor(value, key: str):
    """A dict's ids or mask as a tensor: tensors as they are, lists of int rows (a BatchEncoding without
    `return_tensors`) converted; anything else refused."""
    if value is None or isinstance(value, torch.Tensor):
        return value
    if (isinstance(value, list) and value and all(isinstance(row, list) and row for row in value)
            and all(isinstance(t, int) and not isinstance(t, bool) for row in value for t in row)):
        if len({len(row) for row in value}) != 1:
            raise ValueError(f"the rows of {key!r} have different lengths: pad them (left) to one length")
        return torch.tensor(value)
    raise TypeError(f"{key!r} must be a tensor or a list of lists of ints; got {_describe(value)}; "
                    f"accepted prompts: {PROMPT_KINDS}")


def _describe(value) -> str:
    if isinstance(value, (list, tuple)):
        if not value:
            return f"an empty {type(value).__name__}"
        kinds = sorted({type(item).__name__ for item in value})
        return f"a {type(value).__name__} of {', '.join(kinds)}" + (" (an empty string)" if "" in value else "")
    return type(value).__name__


def _checked_ids(model, input_ids: torch.Tensor, attention_mask) -> tuple[torch.Tensor, torch.Tensor]:
    if input_ids.ndim != 2 or input_ids.shape[0] == 0 or input_ids.shape[1] == 0 or input_ids.is_floating_point():
        raise TypeError(f"input_ids must be an integer tensor [batch, tokens], both >= 1; got "
                        f"{input_ids.dtype} of shape {tuple(input_ids.shape)}")
    if attention_mask is None:
        attention_mask = torch.ones_like(input_ids)
    if not isinstance(attention_mask, torch.Tensor) or attention_mask.shape != input_ids.shape:
        raise TypeError(f"attention_mask must be a tensor of the input_ids' shape {tuple(input_ids.shape)}; got "
                        f"{_describe(attention_mask) if not isinstance(attention_mask, torch.Tensor) else tuple(attention_mask.shape)}")
    mask = attention_mask.long()
    if not ((mask == 0) | (mask == 1)).all():
        raise ValueError("attention_mask must hold only 0 (padding) and 1 (a real token)")
    if (mask.sum(-1) == 0).any():
        raise ValueError(f"rows {(mask.sum(-1) == 0).nonzero().flatten().tolist()} of the batch have no real token")
    right_padded = (mask[:, 1:] < mask[:, :-1]).any(-1)
    if right_padded.any():
        raise ValueError(f"rows {right_padded.nonzero().flatten().tolist()} are right-padded; verification needs "
                         "left padding (padding before the prompt), as the model's tokenizer pads")
    return input_ids.to(model.device), mask.to(model.device)


def row_alone(input_ids: torch.Tensor, attention_mask: torch.Tensor, row: int) -> torch.Tensor:
    """`[1, n]` the real tokens of one row of a left-padded batch."""
    return input_ids[row : row + 1, attention_mask[row].bool()]


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
    if hasattr(model.hf_model, "hf_device_map"):  # dispatched by accelerate: offloaded weights are on "meta"
        state = get_state_dict_offloaded_model(model.hf_model)  # loaded module by module, onto the CPU
        reference.load_state_dict(state, strict=False)  # buffers that are not weights keep their fresh values
        missing = {name for name, _ in reference.named_parameters()} - set(state)
        if missing:
            raise RuntimeError(f"could not read the dispatched model's weights {sorted(missing)[:5]}")
    else:
        reference.load_state_dict(model.hf_model.state_dict())
    return reference.to(model.device).eval()


def original_logits(reference, input_ids, attention_mask) -> torch.Tensor:
    """An unwrapped transformers model called as `generate` calls it (padding-aware position ids)."""
    kwargs = {}
    if "position_ids" in inspect.signature(reference.forward).parameters:
        kwargs["position_ids"] = padding_aware_position_ids(attention_mask)
    return reference(input_ids, attention_mask=attention_mask, use_cache=False, **kwargs).logits


def aligned_logits(pieces: list[tuple[int, torch.Tensor | None]], total_length: int):
    """A decode loop's logits placed at their token slots: `pieces` is `(new tokens, logits [b, kept, v])`
    per forward, where a forward returns the logits of its last `kept` tokens (all of them, or one as
    `generate` asks with `logits_to_keep=1`). Returns `(logits [b, total_length, v], scored [1, total_length])`,
    zeros and False where no logits were returned."""
    kept = [logits for _, logits in pieces if logits is not None]
    if not kept:
        raise ValueError("the decode loop's forwards returned no logits")
    got = kept[0].new_zeros(kept[0].shape[0], total_length, kept[0].shape[-1])
    scored = torch.zeros(1, total_length, dtype=torch.bool, device=got.device)
    slot = 0
    for new_tokens, logits in pieces:
        slot += new_tokens
        if logits is not None:
            got[:, slot - logits.shape[1] : slot] = logits
            scored[:, slot - logits.shape[1] : slot] = True
    return got, scored


