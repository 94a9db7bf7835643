"""Alignment by absolute position: recorded hook calls scattered into tables over the whole sequence.

A run feeds its tokens over several forwards (prefill, prompt chunks, decode steps, left padding); the
same token has the same absolute position in every run, whichever forward reached it. The tables here
place each recorded call by those positions, so `Recording.stacked` can stitch a run into one tensor and
`from_source` can replay one run into another:

- `TokenTable`   per-token hooks: (row, position) -> the token's activation;
- `KeyedTable`   `[b, h, p, k]` hooks: (row, head, query position, key position) -> the value the query
                 formed for the entry that held that key position;
- `EntryTable`   cache-entry hooks `[b, g, k, ...]`: (row, KV head, entry position) -> the entry's value;
- `StepTable`    compression-policy hooks, which have no token axis: by decode step.

Padding tokens and padding / hole entries (position -1) stand for no token and are never placed.
`strict=True` refuses a place filled twice (two runs, a rewind and replay, beam search): the stitched
tensor would be ambiguous. Otherwise the last call wins.
"""

from __future__ import annotations

import torch

from interp_cache.core.attention import kv_to_query_heads


def num_positions(calls) -> int:
    """T: one more than the largest real (non-padding) token position of any call."""
    return max((int(c.positions[~c.is_padding].max()) + 1 for c in calls if bool((~c.is_padding).any())), default=0)


def source_rows(num_source_rows: int, num_target_rows: int, name: str, device) -> torch.Tensor:
    """Which table row each target row reads: the same row, or row 0 of a one-row source (broadcast)."""
    if num_source_rows == num_target_rows:
        return torch.arange(num_target_rows, device=device)
    if num_source_rows == 1:
        return torch.zeros(num_target_rows, dtype=torch.long, device=device)
    raise ValueError(
        f"the source of {name!r} has batch size {num_source_rows}; the target has {num_target_rows} "
        "(they must match, or the source must have one row to broadcast)"
    )


def _claim(name: str, written: torch.Tensor, index: tuple[torch.Tensor, ...], step: int) -> None:
    """Mark `index` as filled. A place filled twice is ambiguous, and says where the second value came from."""
    strides = torch.tensor(written.stride(), device=written.device)
    flat = (torch.stack(index, dim=-1) * strides).sum(-1) if index[0].numel() else index[0]
    _, inverse, counts = flat.unique(return_inverse=True, return_counts=True)
    if bool((counts > 1).any()):
        first = int((counts[inverse] > 1).nonzero()[0, 0])
        place = [int(axis[first]) for axis in index]
        if len(place) == 4:
            row, head, query, key = place
            what = (f"row {row} head {head}: the query at position {query} read two cache entries at key position "
                    f"{key}; the cache holds one position twice")
        else:
            what = f"row {place[0]} has two tokens at position {place[1]} in one forward"
        raise ValueError(f"{name!r} step {step}: {what}, so the stitched tensor would be ambiguous")
    clash = written[index]
    if bool(clash.any()):
        first = int(clash.nonzero()[0, 0])
        row, position = int(index[0][first]), int(index[-2 if len(index) == 4 else -1][first])
        raise ValueError(
            f"{name!r}: row {row} position {position} was recorded more than once (again at step {step}); the "
            f"recording spans several passes over the sequence (two runs, a rewind, beam search). Record each "
            f"sequence separately, or read the per-step entries rec[{name!r}]"
        )
    written[index] = True


INTEGER_DTYPES = (torch.int8, torch.int16, torch.int32, torch.int64)


def _fill(dtype: torch.dtype, strict: bool):
    """Where a stitched tensor has no value: NaN, or -1 for integer hooks (positions are never -1)."""
    if not strict:
        return 0
    return float("nan") if dtype.is_floating_point else -1


class TokenTable:
    """Per-token hooks: `values_bt...` `[b, T, *rest]` and `have_bt` `[b, T]` over absolute positions."""

    def __init__(self, name: str, calls: list, token_axis: int, strict: bool = False):
        self.name, self.axis = name, token_axis
        self.num_positions = num_positions(calls)
        first = calls[0].activation
        rest = [size for dim, size in enumerate(first.shape) if dim not in (0, token_axis)]
        size = max(self.num_positions, 1)
        self.values_bt = first.new_full((first.shape[0], size, *rest), _fill(first.dtype, strict))
        self.have_bt = torch.zeros((first.shape[0], size), dtype=torch.bool, device=first.device)
        for call in calls:
            activation_bpr = call.activation.movedim(token_axis, 1)
            if list(activation_bpr.shape[2:]) != rest:
                raise ValueError(
                    f"{name!r} changes shape between calls ({tuple(first.shape)} at step {calls[0].step}, "
                    f"{tuple(call.activation.shape)} at step {call.step}); stitching needs equal non-token axes"
                )
            rows, slots = (~call.is_padding).nonzero(as_tuple=True)
            positions = call.positions[rows, slots]
            if strict:
                _claim(name, self.have_bt, (rows, positions), call.step)
            self.values_bt[rows, positions] = activation_bpr[rows, slots]
            self.have_bt[rows, positions] = True

    def stacked(self) -> torch.Tensor:
        """The table with its token axis where the hook has it: positions 0 .. T-1."""
        return self.values_bt[:, : self.num_positions].movedim(1, self.axis).contiguous()

    def lookup(self, positions_bp: torch.Tensor, rows_b: torch.Tensor):
        """Values at the target's token positions, in the hook's layout, and `have` `[b, p]`."""
        inside_bp = positions_bp < self.num_positions
        index_bp = positions_bp.clamp(max=self.values_bt.shape[1] - 1)
        have_bp = self.have_bt[rows_b[:, None], index_bp] & inside_bp
        return self.values_bt[rows_b[:, None], index_bp].movedim(1, self.axis), have_bp


class KeyedTable:
    """`[b, h, p, k]` hooks: `values_bhqk` and `have_bhqk` over (query position, key position)."""

    def __init__(self, name: str, calls: list, strict: bool = False):
        self.name = name
        self.num_positions = num_positions(calls)
        first = calls[0].activation
        b, h = first.shape[:2]
        t = max(self.num_positions, 1)
        self.values_bhqk = first.new_full((b, h, t, t), _fill(first.dtype, strict))
        self.have_bhqk = torch.zeros((b, h, t, t), dtype=torch.bool, device=first.device)
        for call in calls:
            if call.key_positions is None:
                raise ValueError(f"{name!r} step {call.step} was recorded without key positions; cannot place its columns")
            activation_bhpk, key_positions_bgk = call.activation, call.key_positions
            g = key_positions_bgk.shape[1]
            if activation_bhpk.shape[1] != h or h % g or activation_bhpk.shape[-1] != key_positions_bgk.shape[-1]:
                raise ValueError(
                    f"{name!r} step {call.step}: activation {tuple(activation_bhpk.shape)} does not fit key positions "
                    f"{tuple(key_positions_bgk.shape)} (expected [b, {h}, p, k] with [b, g, k], {h} divisible by g)"
                )
            key_positions_bhk = kv_to_query_heads(key_positions_bgk, h)
            valid_bhpk = (~call.is_padding)[:, None, :, None] & (key_positions_bhk >= 0)[:, :, None, :]
            rows, heads, queries, keys = valid_bhpk.nonzero(as_tuple=True)
            index = (rows, heads, call.positions[rows, queries], key_positions_bhk[rows, heads, keys])
            if strict:
                _claim(name, self.have_bhqk, index, call.step)
            self.values_bhqk[index] = activation_bhpk[rows, heads, queries, keys]
            self.have_bhqk[index] = True

    def stacked(self) -> torch.Tensor:
        """`[b, h, T, T]`: defined where the key position is at or before the query's; the fill elsewhere."""
        t = self.num_positions
        values, have = self.values_bhqk[:, :, :t, :t], self.have_bhqk[:, :, :t, :t]
        causal = torch.ones(t, t, dtype=torch.bool, device=have.device).tril()
        fill = _fill(values.dtype, strict=True)
        return values.masked_fill(~(have & causal), fill).contiguous()

    def lookup(self, query_positions_bp: torch.Tensor, key_positions_bhk: torch.Tensor, rows_b: torch.Tensor):
        """Values `[b, h, p, k]` at the target's (query, key) positions, and `have` of the same shape."""
        h = key_positions_bhk.shape[1]
        limit = self.values_bhqk.shape[-1] - 1
        query_b1p1 = query_positions_bp.clamp(min=0, max=limit)[:, None, :, None]
        key_bh1k = key_positions_bhk.clamp(min=0, max=limit)[:, :, None, :]
        heads_1h11 = torch.arange(h, device=rows_b.device)[None, :, None, None]
        rows_b111 = rows_b[:, None, None, None]
        query_inside_b1p1 = (query_positions_bp < self.num_positions)[:, None, :, None]
        key_inside_bh1k = (key_positions_bhk < self.num_positions)[:, :, None, :]
        have = self.have_bhqk[rows_b111, heads_1h11, query_b1p1, key_bh1k] & query_inside_b1p1 & key_inside_bh1k
        return self.values_bhqk[rows_b111, heads_1h11, query_b1p1, key_bh1k], have


class EntryTable:
    """Cache-entry hooks `[b, g, k, ...]`: `values_bgt...` and `have_bgt` over entry positions."""

    def __init__(self, name: str, calls: list):
        self.name = name
        self.num_positions = 1 + max(int(c.key_positions.max()) for c in calls)
        first = calls[0].activation
        b, g = first.shape[:2]
        t = max(self.num_positions, 1)
        self.values_bgt = first.new_zeros((b, g, t, *first.shape[3:]))
        self.have_bgt = torch.zeros((b, g, t), dtype=torch.bool, device=first.device)
        for call in calls:
            rows, heads, entries = (call.key_positions >= 0).nonzero(as_tuple=True)
            positions = call.key_positions[rows, heads, entries]
            self.values_bgt[rows, heads, positions] = call.activation[rows, heads, entries]
            self.have_bgt[rows, heads, positions] = True

    def lookup(self, key_positions_bgk: torch.Tensor, rows_b: torch.Tensor):
        """Values `[b, g, k, ...]` at the target's entry positions, and `have` `[b, g, k]`."""
        g = key_positions_bgk.shape[1]
        rows_b11 = rows_b[:, None, None]
        heads_1g1 = torch.arange(g, device=rows_b.device)[None, :, None]
        index_bgk = key_positions_bgk.clamp(min=0, max=self.values_bgt.shape[2] - 1)
        have_bgk = self.have_bgt[rows_b11, heads_1g1, index_bgk] & (key_positions_bgk < self.num_positions)
        return self.values_bgt[rows_b11, heads_1g1, index_bgk], have_bgk


class StepTable:
    """Compression-policy hooks: one activation per decode step."""

    def __init__(self, name: str, calls: list):
        self.name = name
        self.by_step = {call.step: call.activation for call in calls}
