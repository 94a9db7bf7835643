"""HookedCache: a `transformers.Cache` that knows the true position of every entry it holds.

Each layer stores keys and values `[b, g, capacity, d]` and the absolute position of every entry
`[b, g, capacity]` (per batch row and KV head; -1 marks padding, so the padding flag and the position
live in one tensor). Storage grows by doubling, so appending a decode step copies nothing but the new
entries. The *logical* length (token slots fed to the model, padding included) is what transformers sees
through `get_seq_length`; the *physical* length (entries stored) is what attention reads. The two differ
once a compression policy evicts entries, and positions of new tokens always come from the logical side.
"""

from __future__ import annotations

import copy

import torch
from transformers.cache_utils import Cache, CacheLayerMixin

from interp_cache.context import ForwardContext
from interp_cache.hook_points import CacheHooks, run_hook

PADDING_POSITION = -1
_MIN_CAPACITY = 16


class HookedCacheLayer(CacheLayerMixin):
    """One layer's entries: keys, values, positions; written and read through the cache hooks."""

    is_sliding = False
    is_compileable = False
    is_croppable = True

    def __init__(self):
        super().__init__()
        self.positions: torch.Tensor | None = None  # [b, g, capacity]
        self.physical_length = 0
        self.logical_length = 0
        self.has_padding = False

    # -- storage -------------------------------------------------------------------------------------
    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        self.dtype, self.device = key_states.dtype, key_states.device
        b, g, _, d = key_states.shape
        self.keys = key_states.new_empty((b, g, 0, d))
        self.values = value_states.new_empty((b, g, 0, value_states.shape[-1]))
        self.positions = torch.empty((b, g, 0), dtype=torch.long, device=key_states.device)
        self.is_initialized = True

    @property
    def capacity(self) -> int:
        return 0 if self.keys is None else self.keys.shape[2]

    def _reserve(self, needed: int) -> None:
        if needed <= self.capacity:
            return
        new_capacity = max(needed, 2 * self.capacity, _MIN_CAPACITY)
        n = self.physical_length

        def grown(old: torch.Tensor, fill) -> torch.Tensor:
            shape = list(old.shape)
            shape[2] = new_capacity
            new = old.new_full(shape, fill) if fill is not None else old.new_empty(shape)
            new[:, :, :n] = old[:, :, :n]
            return new

        self.keys = grown(self.keys, None)
        self.values = grown(self.values, None)
        self.positions = grown(self.positions, PADDING_POSITION)

    def append(self, keys_bgpd: torch.Tensor, values_bgpd: torch.Tensor, positions_bgp: torch.Tensor) -> None:
        if not self.is_initialized:
            self.lazy_initialization(keys_bgpd, values_bgpd)
        p = keys_bgpd.shape[2]
        start = self.physical_length
        self._reserve(start + p)
        self.keys[:, :, start : start + p] = keys_bgpd
        self.values[:, :, start : start + p] = values_bgpd
        self.positions[:, :, start : start + p] = positions_bgp
        self.physical_length = start + p
        self.logical_length += p

    def read(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Views of the stored entries: keys, values `[b, g, k, d]` and positions `[b, g, k]`."""
        n = self.physical_length
        return self.keys[:, :, :n], self.values[:, :, :n], self.positions[:, :, :n]

    def truncate(self, physical_length: int, logical_length: int) -> None:
        self.physical_length = physical_length
        self.logical_length = logical_length
        if self.positions is not None:
            self.positions[:, :, physical_length:] = PADDING_POSITION

    # -- the write -> read path used by the attention core -------------------------------------------
    def write_and_read(
        self,
        keys_bgpd: torch.Tensor,
        values_bgpd: torch.Tensor,
        context: ForwardContext,
        hooks: CacheHooks,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        keys_bgpd = run_hook(hooks.hook_k_write, keys_bgpd, context)
        values_bgpd = run_hook(hooks.hook_v_write, values_bgpd, context)
        b, g, p, _ = keys_bgpd.shape
        self.append(keys_bgpd, values_bgpd, context.stored_positions[:, None, :].expand(b, g, p))
        self.has_padding = self.has_padding or context.has_padding
        keys, values, positions = self.read()
        if hooks.hook_positions.is_hooked():
            positions = run_hook(hooks.hook_positions, positions, context, key_positions=positions)
        keys = run_hook(hooks.hook_k_read, keys, context, key_positions=positions)
        values = run_hook(hooks.hook_v_read, values, context, key_positions=positions)
        return keys, values, positions

    # -- transformers' Cache layer interface ---------------------------------------------------------
    def update(self, key_states, value_states, *args, **kwargs):
        raise RuntimeError(
            "HookedCache is written by interp_cache's attention core, which knows each entry's true position; "
            "a transformers attention module called update() directly, so this model is not wrapped by HookedModel."
        )

    def get_seq_length(self) -> int:
        return self.logical_length

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.logical_length + query_length, 0

    def get_max_length(self) -> int:
        return -1

    def reset(self) -> None:
        self.keys = self.values = self.positions = None
        self.is_initialized = False
        self.physical_length = self.logical_length = 0
        self.has_padding = False

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        self.batch_select_indices(beam_idx)

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        if self.is_initialized:
            indices = indices.to(self.keys.device)
            self.keys = self.keys.index_select(0, indices)
            self.values = self.values.index_select(0, indices)
            self.positions = self.positions.index_select(0, indices)

    def batch_repeat_interleave(self, repeats: int) -> None:
        if self.is_initialized:
            self.keys = self.keys.repeat_interleave(repeats, dim=0)
            self.values = self.values.repeat_interleave(repeats, dim=0)
            self.positions = self.positions.repeat_interleave(repeats, dim=0)

    def crop(self, tokens_to_remove: int) -> None:
        if tokens_to_remove > 0:
            tokens_to_remove = self.logical_length - tokens_to_remove
        if tokens_to_remove == 0:
            return
        removed = abs(tokens_to_remove)
        if self.physical_length != self.logical_length:
            raise ValueError("crop() needs every token slot still stored; this layer has evicted entries")
        self.truncate(self.physical_length - removed, self.logical_length - removed)

    @property
    def nbytes(self) -> int:
        if not self.is_initialized:
            return 0
        return sum(t.numel() * t.element_size() for t in (self.keys, self.values, self.positions))


class HookedCache(Cache):
    """A KV cache with true positions per entry, logical vs physical length and amortised growth."""

    def __init__(self, num_layers: int):
        super().__init__(layers=[HookedCacheLayer() for _ in range(num_layers)])
        self._next_position: torch.Tensor | None = None  # [b] position the next real token of each row gets
        # Positions of forwards not yet folded into _next_position: folding is deferred (and batched) because
        # transformers' generate passes position ids itself and never needs it on the decode hot path.
        self._unfolded_positions: list[torch.Tensor] = []
        self.forward_count = 0  # the decode step of the next forward; 0 is the first (the prefill)
        self.slots_per_forward: list[int] = []  # token slots each past forward fed, for rewind

    # -- lifecycle of one forward --------------------------------------------------------------------
    def derive_positions(self, new_is_padding: torch.Tensor) -> torch.Tensor:
        """True positions `[b, p]` of new tokens: count real tokens per row, never physical entries."""
        b = new_is_padding.shape[0]
        start = self.next_position if self.next_position is not None else new_is_padding.new_zeros(b, dtype=torch.long)
        if start.shape[0] != b:
            raise ValueError(f"the cache holds {start.shape[0]} rows but the input has batch size {b}")
        is_real = (~new_is_padding).long()
        positions = start[:, None] + is_real.cumsum(-1) - 1
        return positions.masked_fill(new_is_padding, 0)

    @property
    def next_position(self) -> torch.Tensor | None:
        if self._unfolded_positions:
            stored = torch.cat(self._unfolded_positions, dim=-1)  # [b, total new]; -1 for padding
            self._unfolded_positions = []
            last_real = stored.max(dim=-1).values + 1
            if self._next_position is None:
                self._next_position = last_real.clamp(min=0)
            else:
                self._next_position = torch.maximum(self._next_position, last_real)
        return self._next_position

    @next_position.setter
    def next_position(self, value: torch.Tensor | None) -> None:
        self._unfolded_positions = []
        self._next_position = value

    def end_forward(self, context: ForwardContext) -> None:
        self._unfolded_positions.append(context.stored_positions)
        if len(self._unfolded_positions) >= 64:
            self.next_position  # fold, so the list stays short
        self.forward_count += 1
        self.slots_per_forward.append(context.num_new)

    def snapshot_lengths(self) -> list[tuple[int, int]]:
        return [(layer.physical_length, layer.logical_length) for layer in self.layers]

    def rollback(self, lengths: list[tuple[int, int]]) -> None:
        """Undo the writes of a forward that raised, so a failed step leaves the cache as it was."""
        for layer, (physical, logical) in zip(self.layers, lengths):
            layer.truncate(physical, logical)

    # -- what users ask of a cache -------------------------------------------------------------------
    @property
    def logical_length(self) -> int:
        return self.layers[0].logical_length

    @property
    def physical_lengths(self) -> list[int]:
        return [layer.physical_length for layer in self.layers]

    @property
    def nbytes(self) -> int:
        """Every byte the cache holds: keys, values and positions of every layer, spare capacity included."""
        extra = 0 if self.next_position is None else self.next_position.numel() * self.next_position.element_size()
        return sum(layer.nbytes for layer in self.layers) + extra

    def kept_positions(self, layer_idx: int) -> torch.Tensor:
        """True positions `[b, g, kept]` of the entries layer `layer_idx` stores (-1: padding)."""
        return self.layers[layer_idx].read()[2]

    def fork(self) -> "HookedCache":
        """An independent copy: continuations from the fork never touch this cache."""
        return copy.deepcopy(self)

    def rewind(self, num_tokens: int) -> None:
        """Forget the last `num_tokens` token slots (decode steps), e.g. to try another continuation."""
        if num_tokens < 0 or num_tokens > self.logical_length:
            raise ValueError(f"rewind needs 0 <= num_tokens <= {self.logical_length}; got {num_tokens}")
        if num_tokens == 0:
            return
        for layer in self.layers:
            layer.crop(-num_tokens)
        stored = self.layers[0].positions[:, 0, : self.layers[0].physical_length]
        if stored.shape[-1] == 0:
            self.next_position = None
        else:
            self.next_position = (stored.max(dim=-1).values + 1).clamp(min=0)
        remaining = num_tokens
        while remaining:
            last = self.slots_per_forward.pop()
            if last > remaining:  # rewinding into the middle of a forward: it stays, shorter
                self.slots_per_forward.append(last - remaining)
                break
            remaining -= last
            self.forward_count -= 1

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        super().reorder_cache(beam_idx)
        if self.next_position is not None:
            self.next_position = self.next_position.index_select(0, beam_idx.to(self.next_position.device))

    def batch_repeat_interleave(self, repeats: int) -> None:
        super().batch_repeat_interleave(repeats)
        if self.next_position is not None:
            self.next_position = self.next_position.repeat_interleave(repeats, dim=0)

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        super().batch_select_indices(indices)
        if self.next_position is not None:
            self.next_position = self.next_position[indices]

    def __repr__(self) -> str:
        return (
            f"HookedCache(layers={len(self.layers)}, logical_length={self.logical_length}, "
            f"physical_lengths={self.physical_lengths}, nbytes={self.nbytes})"
        )
