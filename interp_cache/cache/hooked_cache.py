"""HookedCache: a `transformers.Cache` that knows the true position of every entry it holds.

A list of `HookedCacheLayer`s (`interp_cache.cache.layer`) plus what belongs to the whole cache: the
position the next real token of each row gets (counted from real tokens, never from stored entries), the
decode step, the begin / end / rollback of a forward, and what users ask of a cache (lengths, kept
entries, bytes). Editing between steps -- entries, fork, rewind -- is `interp_cache.cache.editing`.
"""

from __future__ import annotations

import torch
from transformers.cache_utils import Cache

from interp_cache.cache.editing import CacheEditing
from interp_cache.cache.layer import HookedCacheLayer
from interp_cache.cache.policy_interface import CachePolicy
from interp_cache.core.context import ForwardContext


class HookedCache(CacheEditing, Cache):
    """A KV cache with true positions per entry, logical vs physical length and amortised growth.

    `policy` (from `interp_cache.compress`) compresses it: every layer consults it when entries are written
    (selection policies choose what attention reads) and after attention (eviction policies choose what
    stays); evictions take effect when the forward completes.
    """

    def __init__(self, num_layers: int, policy: CachePolicy | None = None):
        super().__init__(layers=[HookedCacheLayer(i, num_layers, policy) for i in range(num_layers)])
        self.policy = policy
        self._lengths_before: list[tuple[int, int]] = []  # each layer's (physical, logical) length as the forward began
        self._next_position: torch.Tensor | None = None  # [b] position the next real token of each row gets
        # Positions of forwards not yet folded into _next_position: folding is deferred (and batched) because
        # transformers' generate passes position ids itself and never needs it on the decode hot path.
        self._unfolded_positions: list[torch.Tensor] = []
        self.forward_count = 0  # the decode step of the next forward; 0 is the first (the prefill)
        self.slots_per_forward: list[int] = []  # token slots each past forward fed, for rewind
        # True while a forward of a model on the generic path runs (`adapters.attention_interface`): its
        # modules call update() before attention, and the write belongs to the core, which knows positions.
        self.written_in_attention = False

    def update(self, key_states, value_states, layer_idx, cache_kwargs=None):
        if self.written_in_attention:
            return key_states, value_states  # the attention core writes them, with their true positions
        return self.layers[layer_idx].update(key_states, value_states)  # raises: not a HookedModel forward

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

    def begin_forward(self) -> None:
        """Remember every layer's lengths, so a forward that raises can be undone (`rollback`)."""
        self._lengths_before = [(layer.physical_length, layer.logical_length) for layer in self.layers]

    def end_forward(self, context: ForwardContext) -> None:
        """The forward completed: fold in its positions, count it, and carry out the evictions it decided."""
        self._unfolded_positions.append(context.stored_positions)
        if len(self._unfolded_positions) >= 64:
            self.next_position  # fold, so the list stays short
        self.forward_count += 1
        self.slots_per_forward.append(context.num_new)
        if self.policy is not None:
            for layer in self.layers:
                layer.apply_pending()

    def rollback(self) -> None:
        """Undo the writes of the forward that raised, so a failed step leaves the cache as it was."""
        for layer, (physical, logical) in zip(self.layers, self._lengths_before):
            layer.rollback(physical, logical)

    # -- what users ask of a cache -------------------------------------------------------------------
    @property
    def logical_length(self) -> int:
        return self.layers[0].logical_length

    @property
    def physical_lengths(self) -> list[int]:
        """Per layer, the entries attention reads per head (the longest head where heads differ)."""
        return [0 if not layer.is_initialized else int(layer.slot_counts().max()) for layer in self.layers]

    def kept_counts(self) -> torch.Tensor:
        """`[layers, b, g]` real entries each head of each layer stores (padding slots not counted): the
        head-wise budgets actually in use."""
        return torch.stack([layer.kept_counts() for layer in self.layers])

    @property
    def layer_budgets(self) -> list[int | None]:
        """Per layer, the per-head budget of its last compression (None: never compressed)."""
        return [layer.budget for layer in self.layers]

    @property
    def nbytes(self) -> int:
        """Every byte the cache holds: keys, values, positions, policy state (scores, page bounds) of every layer,
        spare capacity included."""
        extra = 0 if self.next_position is None else self.next_position.numel() * self.next_position.element_size()
        return sum(layer.nbytes for layer in self.layers) + extra

    def kept_positions(self, layer_idx: int) -> torch.Tensor:
        """True positions `[b, g, kept]` of the entries layer `layer_idx` stores (-1: padding)."""
        return self.layers[layer_idx].read()[2]

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
