"""The one attention core every family runs through.

Given queries `[b, h, p, d]` (positional encoding already applied), the keys and values attention reads
`[b, g, k, d]` and their true positions `[b, g, k]`, it computes scores, adds the ALiBi bias from the
stored key positions, masks, softmaxes and mixes values. Family differences are parameters of
`AttentionSpec`, not code paths per family.

Masking rule (position-true, eviction-proof): an entry is visible to a query when it is not padding,
it was written before the query (every entry from an earlier forward; among this forward's own
entries, those at or before the query's index) and, with a sliding window W, when
`query_position - key_position < W`.

Two paths compute the same function. The fast path hands everything to
`scaled_dot_product_attention` and never materialises scores. The explicit path forms scores and
pattern so `hook_attn_scores` / `hook_pattern` can read or replace them; a layer switches to it for one
call when either hook is attached (or when the family needs it: attention-logit softcapping). What a
policy scores entries with -- the attention each received -- is `interp_cache.core.received`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple, Protocol

import torch
import torch.nn.functional as F

from interp_cache.core.context import ForwardContext
from interp_cache.core.hook_points import AttentionHooks, HeadDims, run_hook


def kv_to_query_heads(per_kv_head: torch.Tensor, num_heads: int) -> torch.Tensor:
    """Dim 1 from KV heads `g` to query heads `h`: query head i reads KV head i // (h / g) (GQA, MQA)."""
    g = per_kv_head.shape[1]
    return per_kv_head if g == num_heads else per_kv_head.repeat_interleave(num_heads // g, dim=1)


class ValuesInStorage(Protocol):
    """Values `[b, g, k, d]` a cache read left in storage (a page-selecting read): see `interp_cache.cache`."""

    dtype: torch.dtype

    def materialize(self) -> torch.Tensor: ...

    def mix(self, pattern_bhpk: torch.Tensor, num_heads: int) -> torch.Tensor:
        """`pattern @ values` `[b, h, 1, d]` for a single query per row, read straight from storage."""
        ...


class CacheRead(NamedTuple):
    """What attention reads from a cache layer this forward."""

    keys: torch.Tensor  # [b, g, k, d]
    values: torch.Tensor | ValuesInStorage  # [b, g, k, d], or rows still in storage
    positions: torch.Tensor  # [b, g, k] true positions, -1: nothing to attend
    heads_share_positions: bool  # every head (and layer) reads the same positions: one mask serves all
    has_invisible_slots: bool  # some slot is -1 (padding, head-wise holes, a hidden slot): masks are needed


@dataclass(frozen=True)
class AttentionSpec:
    num_heads: int
    num_kv_heads: int
    head_dim: int
    scaling: float
    softcap: float | None = None  # Gemma-2: scores -> softcap * tanh(scores / softcap)
    sliding_window: int | None = None  # a key is visible while query_pos - key_pos < sliding_window
    alibi_slopes: torch.Tensor | None = None  # [h] float32; bias = slope * key_position * alibi_scale
    alibi_scale: float = 1.0  # Falcon-RW divides the bias by sqrt(head_dim)
    alibi_dtype: torch.dtype | None = None  # Falcon computes slope * position in bfloat16
    score_dtype: torch.dtype | None = None  # GPT-J forms scores and softmax in float32 whatever the model dtype

    @property
    def uses_alibi(self) -> bool:
        return self.alibi_slopes is not None

    @property
    def head_dims(self) -> HeadDims:
        return HeadDims(self.num_heads, self.num_kv_heads, self.head_dim, self.score_dtype)


def alibi_bias(spec: AttentionSpec, key_positions_bgk: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """ALiBi bias `[b, h, 1, k]` from the stored (true) key positions.

    Softmax is invariant to a per-query constant, so `slope * key_position` equals the textbook
    `-slope * (query_position - key_position)` -- and needs no query position, which is what makes it
    right for a cached decode step (seed 003: bias rows taken for position 0 instead of the new token).
    """
    b, g, k = key_positions_bgk.shape
    positions = kv_to_query_heads(key_positions_bgk.clamp(min=0), spec.num_heads)
    slopes = spec.alibi_slopes.to(positions.device)
    if spec.alibi_dtype is not None:
        bias = (slopes.to(spec.alibi_dtype)[None, :, None] * positions).to(dtype)
    else:
        bias = (slopes[None, :, None] * positions).to(dtype)
    if spec.alibi_scale != 1.0:
        bias = bias * spec.alibi_scale
    return bias[:, :, None, :]


def visibility_mask(
    query_positions_bp: torch.Tensor,
    key_positions_bgk: torch.Tensor,
    num_new: int,
    sliding_window: int | None,
) -> torch.Tensor:
    """Boolean `[b, g, p, k]`: True where the query may attend the entry (see the module docstring).

    The queries are this forward's new tokens; the last `num_new` entries are this forward's own.
    """
    k = key_positions_bgk.shape[-1]
    p = query_positions_bp.shape[-1]
    visible = (key_positions_bgk >= 0)[:, :, None, :].expand(-1, -1, p, -1)
    if p > 1:  # a single query (a decode step) was written after every entry it reads
        written_before = torch.ones(p, k, dtype=torch.bool, device=key_positions_bgk.device)
        own = torch.ones(p, num_new, dtype=torch.bool, device=written_before.device)
        written_before[:, k - num_new :] = own.tril()
        visible = visible & written_before
    if sliding_window is not None:
        distance = query_positions_bp[:, None, :, None] - key_positions_bgk[:, :, None, :]
        visible = visible & (distance < sliding_window)
    return visible


def masked_scores(
    query_bhpd: torch.Tensor,
    keys_bgkd: torch.Tensor,
    spec: AttentionSpec,
    bias_bhpk: torch.Tensor | None,
    visible_bhpk: torch.Tensor | None,
) -> torch.Tensor:
    """Pre-softmax scores `[b, h, p, k]`: scaled, softcapped, ALiBi-biased, invisible entries at the dtype minimum."""
    b, h, p, d = query_bhpd.shape
    g, k = keys_bgkd.shape[1], keys_bgkd.shape[2]
    # The query heads sharing a KV head as one [r * p, d] matrix: one matmul per KV head, and the keys are not
    # broadcast (copied) to every query head first.
    query_bg_rp_d = query_bhpd.reshape(b, g, (h // g) * p, d)
    scores = torch.matmul(query_bg_rp_d, keys_bgkd.transpose(-1, -2)).view(b, h, p, k)
    # In place on the matmul's own output: the same values, and a 2048-token prefill allocates (and faults in)
    # one [b, h, p, k] tensor per layer instead of three.
    scores.mul_(spec.scaling)
    if spec.softcap is not None:
        scores.div_(spec.softcap).tanh_().mul_(spec.softcap)
    if bias_bhpk is not None:
        scores.add_(bias_bhpk)
    if visible_bhpk is not None:
        scores.masked_fill_(~visible_bhpk, torch.finfo(scores.dtype).min)
    return scores


def _window_reaches_out(context: ForwardContext, key_positions_bgk: torch.Tensor, sliding_window: int | None) -> bool:
    return sliding_window is not None and bool(context.positions.max() - key_positions_bgk.min() >= sliding_window)


def _visibility(read: CacheRead, spec: AttentionSpec, context: ForwardContext, explicit: bool, has_bias: bool):
    """The boolean mask `[b, 1 or h, p, k]` this read needs, or None where SDPA's own causality suffices."""
    p, k = context.num_new, read.keys.shape[2]
    masked = read.has_invisible_slots or _window_reaches_out(context, read.positions, spec.sliding_window)
    if not (masked or (p > 1 and (explicit or k != p or has_bias))):
        return None
    # Layers whose heads share key positions (no head-wise eviction) share one mask per forward.
    memo_key = (spec.sliding_window, k) if read.heads_share_positions else None
    visible = context.mask_memo.get(memo_key) if memo_key else None
    if visible is None:
        mask_positions = read.positions[:, :1] if read.heads_share_positions else read.positions
        visible = visibility_mask(context.positions, mask_positions, p, spec.sliding_window)
        if visible.shape[1] != 1:  # one mask per KV head; a shared one broadcasts over heads as it is
            visible = kv_to_query_heads(visible, spec.num_heads)
        if memo_key:
            context.mask_memo[memo_key] = visible
    return visible


def _additive_mask(visible, bias, dtype: torch.dtype, p: int) -> tuple[torch.Tensor | None, bool]:
    """`(attn_mask, is_causal)` for SDPA: the mask as 0 / dtype minimum plus the ALiBi bias."""
    if visible is not None:
        attn_mask = torch.zeros(visible.shape, dtype=dtype, device=visible.device)
        attn_mask.masked_fill_(~visible, torch.finfo(dtype).min)
        return (attn_mask if bias is None else attn_mask + bias), False
    if bias is not None:
        return bias, False
    return None, p > 1  # causal: one forward over an empty cache, no padding (k == p)


def _explicit(query_bhpd, keys_bgkd, values_bgkd, read, spec, context, hooks, bias, visible) -> torch.Tensor:
    """Scores and pattern formed, so `hook_attn_scores` / `hook_pattern` can read or replace them."""
    b, h, p, _ = query_bhpd.shape
    g, k = spec.num_kv_heads, keys_bgkd.shape[2]
    scores = masked_scores(query_bhpd, keys_bgkd, spec, bias, visible)
    scores = run_hook(hooks.hook_attn_scores, scores, context, key_positions=read.positions)
    pattern = torch.softmax(scores, dim=-1, dtype=torch.float32).to(values_bgkd.dtype)
    pattern = run_hook(hooks.hook_pattern, pattern, context, key_positions=read.positions)
    pattern_bg_rp_k = pattern.reshape(b, g, (h // g) * p, k)
    return torch.matmul(pattern_bg_rp_k, values_bgkd).view(b, h, p, -1)


def attend(
    query_bhpd: torch.Tensor,
    read: CacheRead,
    spec: AttentionSpec,
    context: ForwardContext,
    hooks: AttentionHooks,
    force_explicit: bool = False,
) -> torch.Tensor:
    """Attention output z `[b, p, h, d]` (before the output projection).

    Three ways to the same function: the explicit path (scores and pattern formed, for their hooks and for
    softcapping), a single query mixing values still in storage, and SDPA.
    """
    keys_bgkd, values = read.keys, read.values
    explicit = force_explicit or spec.softcap is not None or hooks.needs_explicit_scores()
    if spec.score_dtype is not None and query_bhpd.dtype != spec.score_dtype:
        query_bhpd, keys_bgkd = query_bhpd.to(spec.score_dtype), keys_bgkd.to(spec.score_dtype)
        explicit = True
    dtype, p = query_bhpd.dtype, query_bhpd.shape[2]
    bias = None
    if spec.uses_alibi:
        bias = alibi_bias(spec, read.positions, dtype).expand(-1, -1, p, -1)
        bias = run_hook(hooks.hook_pos_bias, bias, context, key_positions=read.positions)
    in_storage = not isinstance(values, torch.Tensor)
    if in_storage and (explicit or p != 1 or values.dtype != torch.float32):
        values, in_storage = values.materialize(), False
    visible = _visibility(read, spec, context, explicit, bias is not None)
    if explicit:
        z_bhpd = _explicit(query_bhpd, keys_bgkd, values, read, spec, context, hooks, bias, visible)
    else:
        attn_mask, is_causal = _additive_mask(visible, bias, dtype, p)
        if in_storage:
            scores = masked_scores(query_bhpd, keys_bgkd, spec, None, None)
            if attn_mask is not None:
                scores = scores + attn_mask
            z_bhpd = values.mix(torch.softmax(scores, dim=-1), spec.num_heads)
        else:
            z_bhpd = F.scaled_dot_product_attention(
                query_bhpd, keys_bgkd, values, attn_mask=attn_mask, is_causal=is_causal, scale=spec.scaling,
                enable_gqa=spec.num_heads != spec.num_kv_heads,
            )
    return run_hook(hooks.hook_z, z_bhpd.transpose(1, 2), context)
