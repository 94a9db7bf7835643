"""The attention each cache entry received: what H2O and SnapKV score entries with.

`received_attention` sums, per entry, the weights the core's masking rule gives it over a forward's (last)
queries, without hooks. A policy that needs it for every query of a forward it evicts in (H2O) can have it
from the attention itself: `attend_and_receive` forms each query block's weights once and both mixes the
values with them and sums them, where SDPA followed by `received_attention` formed the score matrix twice
(H2O's prefill took 1.6x a plain one).

Queries go in blocks of `_QUERY_BLOCK`, and each block reads only the entries written before its last query,
so a prefill forms half the score matrix; masks touch only what they change: the block's own triangle,
padding columns, the window. Scores are formed in float32 whatever the model dtype.
"""

from __future__ import annotations

import torch

from interp_cache.core.attention import AttentionSpec, CacheRead, alibi_bias
from interp_cache.core.context import ForwardContext
from interp_cache.core.hook_points import AttentionHooks, run_hook

_QUERY_BLOCK = 64  # queries per block: a block's scores stay in cache


def received_attention(
    query_bhpd: torch.Tensor,
    keys_bgkd: torch.Tensor,
    key_positions_bgk: torch.Tensor,
    spec: AttentionSpec,
    query_positions_bp: torch.Tensor,
    num_new: int,
    query_weights_bp: torch.Tensor,
    first_query_index: int = 0,
) -> torch.Tensor:
    """`[b, h, k]` float32: the attention weights the core gives each entry, summed over the queries with
    `query_weights_bp` (no hooks): what compression policies score with.

    `query_bhpd` are this forward's queries from index `first_query_index` on; the last `num_new` entries
    are this forward's own; masks follow the core's rule.
    """
    return _blocked(query_bhpd, keys_bgkd, None, key_positions_bgk, spec, query_positions_bp, num_new,
                    query_weights_bp, first_query_index, may_hide_entries=True)[1]


def can_attend_and_receive(query_bhpd: torch.Tensor, read: CacheRead, spec: AttentionSpec, hooks: AttentionHooks,
                           force_explicit: bool) -> bool:
    """Whether `attend_and_receive` computes what `attend` would: float32 scores with no hook that reads or
    changes them (scores, pattern, ALiBi bias), no softcap, and values in hand."""
    return (
        query_bhpd.dtype == torch.float32
        and spec.score_dtype in (None, torch.float32)
        and spec.softcap is None
        and not force_explicit
        and not hooks.needs_explicit_scores()
        and not (spec.uses_alibi and hooks.hook_pos_bias.is_hooked())
        and isinstance(read.values, torch.Tensor)
    )


def attend_and_receive(
    query_bhpd: torch.Tensor, read: CacheRead, spec: AttentionSpec, context: ForwardContext, hooks: AttentionHooks
) -> tuple[torch.Tensor, torch.Tensor]:
    """`attend`'s z `[b, p, h, d]` (after `hook_z`) and `received_attention` over every real query `[b, h, k]`,
    from one pass over the scores. Only where `can_attend_and_receive`."""
    z_bphd, received_bhk = _blocked(
        query_bhpd, read.keys, read.values, read.positions, spec, context.positions, context.num_new,
        ~context.is_padding if context.has_padding else None, 0, may_hide_entries=read.has_invisible_slots,
    )
    return run_hook(hooks.hook_z, z_bphd, context), received_bhk


def _blocked(query_bhpd, keys_bgkd, values_bgkd, key_positions_bgk, spec, query_positions_bp, num_new,
             query_weights_bp, first_query_index, may_hide_entries):
    """`(z [b, p, h, d] or None without values, received [b, h, k])`, block by block of queries.
    `query_weights_bp` None: every query weighs 1. `may_hide_entries` False: no key position is -1 (the read
    says so), so there is no padding column to look for."""
    b, h, p, d = query_bhpd.shape
    g, k = keys_bgkd.shape[1], keys_bgkd.shape[2]
    r = h // g
    earlier = k - num_new  # entries from earlier forwards: visible to every query but for padding / window
    minimum = torch.finfo(torch.float32).min
    # A block of queries is one contiguous [c * r, d] matrix per KV head: one matmul against its keys.
    query_bgprd = (query_bhpd.float() * spec.scaling).view(b, g, r, p, d).transpose(2, 3).contiguous()
    keys_bgdk = keys_bgkd.float().transpose(-1, -2)
    column_bias_bg1rk = None  # ALiBi plus the minimum at padding entries
    if spec.uses_alibi:
        column_bias_bg1rk = alibi_bias(spec, key_positions_bgk, torch.float32).view(b, g, 1, r, k)
    if may_hide_entries and bool((key_positions_bgk < 0).any()):
        padding = torch.zeros(key_positions_bgk.shape, device=keys_bgkd.device)
        padding = padding.masked_fill_(key_positions_bgk < 0, minimum)[:, :, None, None]
        column_bias_bg1rk = padding if column_bias_bg1rk is None else column_bias_bg1rk + padding
    block = (query_bgprd, keys_bgdk, column_bias_bg1rk, key_positions_bgk, query_positions_bp, spec)
    if p == 1 and earlier + first_query_index + 1 == k:
        # A decode step: one query reading every entry -- nothing to sum, no total to keep (H2O's every step,
        # where the blocked form cost more than the attention it scores).
        probs_bgrk = _block_weights(*block, 0, 1, k).view(b, g, r, k)
        z_bphd = None if values_bgkd is None else torch.matmul(probs_bgrk, values_bgkd).view(b, 1, h, -1)
        if query_weights_bp is not None:
            probs_bgrk = probs_bgrk * query_weights_bp.view(b, 1, 1, 1)
        return z_bphd, probs_bgrk.view(b, h, k)
    if query_weights_bp is None:  # the same weighted sum as with padding, so both give the same bits
        query_weights_bp = torch.ones(b, p, dtype=torch.bool, device=keys_bgkd.device)
    total_bg1rk = torch.zeros(b, g, 1, r, k, dtype=torch.float32, device=keys_bgkd.device)
    z_bgprd = None if values_bgkd is None else values_bgkd.new_empty(b, g, p, r, values_bgkd.shape[-1])
    for start in range(0, p, _QUERY_BLOCK):
        stop = min(p, start + _QUERY_BLOCK)
        c, read = stop - start, earlier + first_query_index + stop
        probs_bgcrk = _block_weights(*block, start, stop, read)
        if z_bgprd is not None:
            mixed = torch.matmul(probs_bgcrk.view(b, g, c * r, read), values_bgkd[:, :, :read])
            z_bgprd[:, :, start:stop] = mixed.view(b, g, c, r, -1)
        weights_b11c = query_weights_bp[:, None, None, start:stop].to(torch.float32)
        received_bg1rk = torch.matmul(weights_b11c, probs_bgcrk.view(b, g, c, r * read)).view(b, g, 1, r, read)
        total_bg1rk[..., :read] += received_bg1rk
    z_bphd = None if z_bgprd is None else z_bgprd.permute(0, 2, 1, 3, 4).reshape(b, p, h, -1)
    return z_bphd, total_bg1rk.view(b, h, k)


def _block_weights(query_bgprd, keys_bgdk, column_bias_bg1rk, key_positions_bgk, query_positions_bp, spec,
                   start: int, stop: int, read: int) -> torch.Tensor:
    """Attention weights `[b, g, c, r, read]` of queries `start:stop` over the first `read` entries, the last
    `c` of which are the block's own: the core's masking rule, in float32."""
    b, g, _, r, d = query_bgprd.shape
    c = stop - start
    minimum = torch.finfo(torch.float32).min
    scores = torch.matmul(query_bgprd[:, :, start:stop].view(b, g, c * r, d), keys_bgdk[..., :read])
    scores = scores.view(b, g, c, r, read)
    if spec.softcap is not None:
        scores = torch.tanh(scores / spec.softcap) * spec.softcap
    if column_bias_bg1rk is not None:
        scores += column_bias_bg1rk[..., :read]
    if c > 1:  # a later query's own entry is hidden from an earlier one
        own_block = torch.ones(c, c, dtype=torch.bool, device=scores.device).triu(1)[:, None, :]
        scores[..., read - c :].masked_fill_(own_block, minimum)
    if spec.sliding_window is not None:
        distance = query_positions_bp[:, None, start:stop, None] - key_positions_bgk[:, :, None, :read]
        scores.masked_fill_((distance >= spec.sliding_window)[:, :, :, None], minimum)
    return torch.softmax(scores, dim=-1)
