"""Which slots of a hook's activation a patch touches: decode steps x absolute positions x heads (x key positions).

Selectors (each None = everything):

- `steps`: decode steps (`hook.step`; 0 is the first forward on a cache, usually the prefill).
- `positions`: ABSOLUTE token positions (`hook.positions`), never offsets into the current chunk. Per-token
  hooks: the tokens at those positions; keyed hooks `[b, h, p, k]`: the query rows at those positions;
  cache-entry hooks `[b, g, k, ...]`: the entries stored for those positions (`hook.key_positions`).
- `heads`: indices on the hook's head axis -- query heads or KV heads, as its layout declares.
- `key_positions` (keyed hooks only): the key columns whose entries hold those positions.

Padding tokens and padding / hole cache entries (position -1) are never selected. Which axis is which is
read off the hook point's `HookLayout`, never off its name.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import torch

from interp_cache.core.attention import kv_to_query_heads
from interp_cache.core.hook_layout import HookKind, HookLayout

IndexSelector = int | Iterable[int] | torch.Tensor | None

_HEAD_AXIS_HELP = (
    "heads= applies to hooks with a head axis: hook_q/k/v/rot_q/rot_k/z, hook_pos_bias/attn_scores/pattern, "
    "cache.hook_k_write/v_write/k_read/v_read/positions"
)


def along(mask: torch.Tensor, ndim: int, axes: tuple[int, ...]) -> torch.Tensor:
    """View `mask` so its dims sit on `axes` of an `ndim`-dim activation (size 1 elsewhere)."""
    shape = [1] * ndim
    for axis, size in zip(axes, mask.shape):
        shape[axis] = size
    return mask.reshape(shape)


def _index_set(value: IndexSelector, what: str) -> frozenset[int] | None:
    if value is None:
        return None
    if isinstance(value, torch.Tensor):
        if value.is_floating_point() or value.is_complex() or value.dtype == torch.bool:
            raise ValueError(f"{what}= must hold integers; got a {value.dtype} tensor")
        value = value.flatten().tolist()
    items = [value] if isinstance(value, int) else value
    try:
        items = list(items)
    except TypeError:
        raise ValueError(
            f"{what}= must be an int, an iterable of ints (list, range, ...) or None for all; got {value!r}"
        ) from None
    for item in items:
        if isinstance(item, bool) or not isinstance(item, int) or item < 0:
            raise ValueError(f"{what}= must be non-negative integers; got {item!r} in {value!r}")
    if not items:
        raise ValueError(f"{what}= is empty, so it selects nothing; pass None to select every {what[:-1]}")
    return frozenset(items)


@dataclass(frozen=True)
class Selection:
    """Which slots of a hook's activation a patch touches: steps x positions x heads (x key positions)."""

    steps: frozenset[int] | None = None
    positions: frozenset[int] | None = None
    heads: frozenset[int] | None = None
    key_positions: frozenset[int] | None = None

    @classmethod
    def of(
        cls,
        steps: IndexSelector = None,
        positions: IndexSelector = None,
        heads: IndexSelector = None,
        key_positions: IndexSelector = None,
    ) -> Selection:
        return cls(
            _index_set(steps, "steps"),
            _index_set(positions, "positions"),
            _index_set(heads, "heads"),
            _index_set(key_positions, "key_positions"),
        )

    def check(self, name: str, layout: HookLayout, activation: torch.Tensor) -> None:
        """Raise ValueError when a selector does not fit the hook `name` of `layout` (checked at every call)."""
        kind = layout.kind
        if self.positions is not None and kind is HookKind.POLICY:
            raise ValueError(
                f"positions= cannot select on {name!r}: a compression policy's scores / keep-set have no token "
                "axis; select it by steps= only"
            )
        if self.key_positions is not None and kind is not HookKind.KEYED:
            raise ValueError(
                f"key_positions= selects key columns of [b, h, p, k] hooks (hook_pos_bias, hook_attn_scores, "
                f"hook_pattern); {name!r} has none"
                + (" (its entries are selected by positions=)" if kind is HookKind.ENTRIES else "")
            )
        if self.heads is not None:
            axis = layout.head_axis
            if axis is None:
                raise ValueError(f"heads= cannot select on {name!r}: it has no head axis; {_HEAD_AXIS_HELP}")
            num_heads = activation.shape[axis]
            if max(self.heads) >= num_heads:
                raise ValueError(
                    f"heads={sorted(self.heads)} out of range for {name!r}, which has {num_heads} heads "
                    f"(indices 0..{num_heads - 1}) on axis {axis}"
                )

    def selects_step(self, step: int | None) -> bool:
        return self.steps is None or step in self.steps

    def mask(self, activation: torch.Tensor, hook) -> torch.Tensor | None:
        """Boolean mask broadcastable to `activation`, True on selected slots; None when none is selected."""
        layout = hook.layout
        self.check(hook.name, layout, activation)
        if not self.selects_step(hook.step):
            return None
        kind = layout.kind
        ndim = activation.ndim
        device = activation.device
        if kind is HookKind.POLICY:
            mask = torch.ones((1,) * ndim, dtype=torch.bool, device=device)
        elif kind is HookKind.ENTRIES:
            key_positions_bgk = hook.key_positions
            entry_bgk = key_positions_bgk >= 0
            if self.positions is not None:
                entry_bgk = entry_bgk & _isin(key_positions_bgk, self.positions)
            mask = along(entry_bgk, ndim, (0, 1, 2))
        else:
            token_bp = ~hook.is_padding
            if self.positions is not None:
                token_bp = token_bp & _isin(hook.positions, self.positions)
            if kind is HookKind.TOKENS:
                mask = along(token_bp, ndim, (0, layout.token_axis))
            else:
                key_positions_bhk = kv_to_query_heads(hook.key_positions, activation.shape[1])
                column_bhk = key_positions_bhk >= 0
                if self.key_positions is not None:
                    column_bhk = column_bhk & _isin(key_positions_bhk, self.key_positions)
                mask = token_bp[:, None, :, None] & column_bhk[:, :, None, :]
        if self.heads is not None:
            axis = layout.head_axis
            head_h = torch.zeros(activation.shape[axis], dtype=torch.bool, device=device)
            head_h[sorted(self.heads)] = True
            mask = mask & along(head_h, ndim, (axis,))
        return mask if bool(mask.any()) else None


def _isin(values: torch.Tensor, selected: frozenset[int]) -> torch.Tensor:
    return torch.isin(values, torch.tensor(sorted(selected), dtype=values.dtype, device=values.device))


