"""What a recording will cost before running it: an upper bound on `Recording.nbytes` from hook layouts.

Each hook point declares its axes and fixed sizes (`HookLayout`); the bound multiplies them by the
varying sizes of every forward -- batch rows, new token slots, cache entries read -- so it needs no
knowledge of hook names and covers any hook point the model has.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from interp_cache.analysis.recording import as_filter, check_names
from interp_cache.core.hook_layout import HookKind

_POSITION_BYTES = 8  # int64 positions
_PADDING_FLAG_BYTES = 1  # bool


def generation_forward_lengths(prompt_length: int, max_new_tokens: int) -> list[int]:
    """Token slots each forward of `generate(max_new_tokens=N)` feeds: the prompt, then N-1 single tokens.

    The last generated token is chosen but never fed, so N new tokens cost N forwards (and 0 cost none:
    `generate` returns the prompt without running the model).
    """
    if prompt_length < 1 or max_new_tokens < 0:
        raise ValueError(f"need prompt_length >= 1 and max_new_tokens >= 0; got {prompt_length}, {max_new_tokens}")
    if max_new_tokens == 0:
        return []
    return [prompt_length] + [1] * (max_new_tokens - 1)


def recording_bytes_bound(
    model,
    batch_size: int,
    forward_lengths: Sequence[int],
    names_filter=None,
    dtype: torch.dtype | None = None,
    include_policy_hooks: bool = False,
) -> int:
    """Upper bound on `rec.nbytes` for recording `names_filter` over forwards of `forward_lengths` slots.

    Forward s feeds p_s token slots (padding included) for `batch_size` = b rows and reads
    k_s = p_1 + ... + p_s cache entries (a compressed cache reads fewer, so the bound still holds). With
    e the element size of a hook's values (its declared dtype -- positions int64, GPT-J's scores float32
    -- else `dtype`, else the model's) and w the product of its fixed sizes (m for the residual stream,
    h*d for q / z, g*d for k / v and the cache's reads and writes, h for keyed hooks, g for policy hooks):

        bytes = sum_s [ b*p_s*(8 + 1)                     positions (int64) + padding flags (bool), once
                      + sum_{token hooks} b*p_s*w*e
                      + sum_{entry hooks} b*k_s*w*e       hook_k_read, hook_v_read
                      + sum_{keyed hooks} b*p_s*k_s*w*e   hook_attn_scores, hook_pattern, hook_pos_bias
                      + sum_{layers with entry positions} b*g*k_s*8 ]

    Both cache reads and keyed hooks grow quadratically over a generation (sum_s k_s and sum_s p_s*k_s);
    which dominates depends on d versus h*p_s: keyed hooks dominate a long prefill, reads the decode
    steps when d > h. For generate with a prompt of P slots and N new tokens, `forward_lengths` is
    `generation_forward_lengths(P, N)` = [P, 1, ..., 1] and sum_s p_s*k_s = P^2 + (P+1) + ... + (P+N-1).

    Hooks whose values are the call's own positions (`hook_position_ids`, `hook_positions`) cost nothing
    extra; the bound counts key positions once per layer, where the recording keeps equal key positions
    of different layers once, so it exceeds the measured bytes by about b*g*k_s*8*(L-1) per step. Policy
    hooks (`hook_scores`, `hook_keep`, at most b*g*k_s each per layer and step) fire only while a
    compression policy runs; count them with `include_policy_hooks=True`.
    """
    check_names(model, names_filter)
    matches = as_filter(names_filter)
    points = [point for name, point in model.hook_dict.items() if matches(name)]
    if not points:
        return 0
    float_size = torch.empty((), dtype=dtype if dtype is not None else model.dtype).element_size()
    per_token = per_entry = per_token_entry = 0  # bytes per (row x slot), (row x entry), (row x slot x entry)
    layers_with_entries: set[int] = set()
    for point in points:
        layout = point.layout
        if layout.kind is not HookKind.TOKENS and point.layer_idx is not None:
            layers_with_entries.add(point.layer_idx)  # its calls carry the positions of the entries read
        if layout.mirrors is not None or (layout.kind is HookKind.POLICY and not include_policy_hooks):
            continue
        fixed_dtype = layout.dtype is not None and (dtype is None or layout.holds_integers)
        size = torch.empty((), dtype=layout.dtype).element_size() if fixed_dtype else float_size
        bytes_per = layout.fixed_elements * size
        if layout.kind is HookKind.TOKENS:
            per_token += bytes_per
        elif layout.kind is HookKind.KEYED:
            per_token_entry += bytes_per
        else:  # entries, policy choices: one value per entry (or fewer pages)
            per_entry += bytes_per
    per_entry += sum(model.runners[layer].spec.num_kv_heads * _POSITION_BYTES for layer in layers_with_entries)

    total, entries = 0, 0
    for p in forward_lengths:
        entries += p
        total += batch_size * p * (_POSITION_BYTES + _PADDING_FLAG_BYTES + per_token)
        total += batch_size * entries * per_entry
        total += batch_size * p * entries * per_token_entry
    return total
