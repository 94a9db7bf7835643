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
call when either hook is attached (or when the family needs it: attention-logit softcapping).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from interp_cache.core.context import ForwardContext
from interp_cache.core.hook_points import AttentionHooks, run_hook


def kv_to_query_heads(per_kv_head: torch.Tensor, num_heads: int) -> torch.Tensor:
    """Dim 1 from KV heads `g` to query heads `h`: query head i reads KV head i // (h / g) (GQA, MQA)."""
    g = per_kv_head.shape[1]
    return per_kv_head if g == num_heads else per_kv_head.repeat_interleave(num_heads // g, dim=1)


@dataclass(frozen=True)
class StoredRows:
    """Values `[b, g, k, d]` left in the cache's storage: rows `rows_bgk` of `storage_nd`, not yet copied.

    A page-selecting read (Quest) hands values this way so a single-token decode step can mix them straight
    from storage (`embedding_bag`), without first copying the selected rows out and reading them again.
    """

    storage_nd: torch.Tensor
    rows_bgk: torch.Tensor

    @property
    def dtype(self) -> torch.dtype:
        return self.storage_nd.dtype

    @property
    def shape(self) -> torch.Size:
        return torch.Size((*self.rows_bgk.shape, self.storage_nd.shape[-1]))

    def materialize(self) -> torch.Tensor:
        return self.storage_nd.index_select(0, self.rows_bgk.reshape(-1)).view(self.shape)


def _mix_stored_rows(pattern_bhpk: torch.Tensor, values: StoredRows, num_heads: int) -> torch.Tensor:
    """`pattern @ values` for p == 1 as one weighted bag of storage rows per query head: `[b, h, 1, d]`."""
    b, g, k = values.rows_bgk.shape
    rows_bhk = kv_to_query_heads(values.rows_bgk, num_heads)
    offsets = torch.arange(0, b * num_heads * k, k, device=rows_bhk.device)
    mixed = F.embedding_bag(
        rows_bhk.reshape(-1), values.storage_nd, offsets, mode="sum", per_sample_weights=pattern_bhpk.reshape(-1)
    )
    return mixed.view(b, num_heads, 1, -1)


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
    first_query_index: int = 0,
) -> torch.Tensor:
    """Boolean `[b, g, p, k]`: True where the query may attend the entry (see the module docstring).

    The queries are this forward's new tokens from index `first_query_index` on (a compression policy
    scores with the last few queries only); the last `num_new` entries are this forward's own.
    """
    k = key_positions_bgk.shape[-1]
    p = query_positions_bp.shape[-1]
    visible = (key_positions_bgk >= 0)[:, :, None, :].expand(-1, -1, p, -1)
    written_before = torch.ones(p, k, dtype=torch.bool, device=key_positions_bgk.device)
    own = torch.ones(p, num_new, dtype=torch.bool, device=written_before.device)
    written_before[:, k - num_new :] = own.tril(diagonal=first_query_index)
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
    query_bgrpd = query_bhpd.view(b, g, h // g, p, d)
    scores = torch.matmul(query_bgrpd, keys_bgkd[:, :, None].transpose(-1, -2)).view(b, h, p, k)
    scores = scores * spec.scaling
    if spec.softcap is not None:
        scores = torch.tanh(scores / spec.softcap) * spec.softcap
    if bias_bhpk is not None:
        scores = scores + bias_bhpk
    if visible_bhpk is not None:
        scores = scores.masked_fill(~visible_bhpk, torch.finfo(scores.dtype).min)
    return scores


def attention_probabilities(
    query_bhpd: torch.Tensor,
    keys_bgkd: torch.Tensor,
    key_positions_bgk: torch.Tensor,
    spec: AttentionSpec,
    query_positions_bp: torch.Tensor,
    num_new: int,
    first_query_index: int = 0,
) -> torch.Tensor:
    """Float32 attention weights `[b, h, p, k]` the core gives these queries (no hooks): what policies score with.

    `query_bhpd` are this forward's queries from index `first_query_index` on; masks follow the core's rule.
    """
    if spec.score_dtype is not None:
        query_bhpd, keys_bgkd = query_bhpd.to(spec.score_dtype), keys_bgkd.to(spec.score_dtype)
    p = query_bhpd.shape[2]
    bias = None
    if spec.uses_alibi:
        bias = alibi_bias(spec, key_positions_bgk, query_bhpd.dtype).expand(-1, -1, p, -1)
    visible = visibility_mask(query_positions_bp, key_positions_bgk, num_new, spec.sliding_window, first_query_index)
    visible = kv_to_query_heads(visible, spec.num_heads)
    scores = masked_scores(query_bhpd, keys_bgkd, spec, bias, visible)
    return torch.softmax(scores, dim=-1, dtype=torch.float32)


def _needs_mask(context: ForwardContext, key_positions_bgk: torch.Tensor, sliding_window: int | None, has_padding: bool):
    if has_padding:
        return True
    if sliding_window is not None:
        span = context.positions.max() - key_positions_bgk.min()
        if span >= sliding_window:
            return True
    return False


def attend(
    query_bhpd: torch.Tensor,
    keys_bgkd: torch.Tensor,
    values_bgkd: torch.Tensor,
    key_positions_bgk: torch.Tensor,
    spec: AttentionSpec,
    context: ForwardContext,
    hooks: AttentionHooks,
    cache_has_padding: bool,
    heads_share_positions: bool = True,
    force_explicit: bool = False,
) -> torch.Tensor:
    """Attention output z `[b, p, h, d]` (before the output projection)."""
    value_dtype = values_bgkd.dtype
    stored_rows = values_bgkd if isinstance(values_bgkd, StoredRows) else None
    if spec.score_dtype is not None and query_bhpd.dtype != spec.score_dtype:
        query_bhpd, keys_bgkd = query_bhpd.to(spec.score_dtype), keys_bgkd.to(spec.score_dtype)
        force_explicit = True
    dtype = query_bhpd.dtype
    p = query_bhpd.shape[2]
    k = keys_bgkd.shape[2]
    min_value = torch.finfo(dtype).min

    bias = None
    if spec.uses_alibi:
        bias = alibi_bias(spec, key_positions_bgk, dtype).expand(-1, -1, p, -1)
        bias = run_hook(hooks.hook_pos_bias, bias, context, key_positions=key_positions_bgk)

    explicit = force_explicit or spec.softcap is not None or hooks.needs_explicit_scores()
    if stored_rows is not None and (explicit or p != 1 or value_dtype != torch.float32):
        values_bgkd = stored_rows.materialize()
        stored_rows = None
    masked = _needs_mask(context, key_positions_bgk, spec.sliding_window, cache_has_padding)
    visible = None
    if masked or (p > 1 and (explicit or k != p or bias is not None)):
        # Layers whose heads share key positions (no head-wise eviction) share one mask per forward.
        memo_key = (spec.sliding_window, k) if heads_share_positions else None
        visible = context.mask_memo.get(memo_key) if memo_key else None
        if visible is None:
            mask_positions = key_positions_bgk[:, :1] if heads_share_positions else key_positions_bgk
            visible = visibility_mask(context.positions, mask_positions, p, spec.sliding_window)
            if visible.shape[1] != 1:  # one mask per KV head; a shared one broadcasts over heads as it is
                visible = kv_to_query_heads(visible, spec.num_heads)
            if memo_key:
                context.mask_memo[memo_key] = visible
    if not explicit:
        attn_mask = None
        is_causal = False
        if visible is not None:
            attn_mask = torch.zeros(visible.shape, dtype=dtype, device=visible.device).masked_fill_(~visible, min_value)
            if bias is not None:
                attn_mask = attn_mask + bias
        elif bias is not None:
            attn_mask = bias
        elif p > 1:
            is_causal = True  # k == p here: one forward over an empty cache, no padding
        if stored_rows is not None:
            scores = masked_scores(query_bhpd, keys_bgkd, spec, None, None)
            if attn_mask is not None:
                scores = scores + attn_mask
            pattern = torch.softmax(scores, dim=-1)
            return run_hook(hooks.hook_z, _mix_stored_rows(pattern, stored_rows, spec.num_heads).transpose(1, 2), context)
        z_bhpd = F.scaled_dot_product_attention(
            query_bhpd,
            keys_bgkd,
            values_bgkd,
            attn_mask=attn_mask,
            is_causal=is_causal,
            scale=spec.scaling,
            enable_gqa=spec.num_heads != spec.num_kv_heads,
        )
    else:
        b, h = query_bhpd.shape[:2]
        g = spec.num_kv_heads
        scores = masked_scores(query_bhpd, keys_bgkd, spec, bias, visible)
        scores = run_hook(hooks.hook_attn_scores, scores, context, key_positions=key_positions_bgk)
        pattern = torch.softmax(scores, dim=-1, dtype=torch.float32).to(value_dtype)
        pattern = run_hook(hooks.hook_pattern, pattern, context, key_positions=key_positions_bgk)
        pattern_bgrpk = pattern.view(b, g, h // g, p, k)
        z_bhpd = torch.matmul(pattern_bgrpk, values_bgkd[:, :, None]).view(b, h, p, -1)

    z_bphd = z_bhpd.transpose(1, 2)
    return run_hook(hooks.hook_z, z_bphd, context)
