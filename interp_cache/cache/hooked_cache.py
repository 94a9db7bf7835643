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
from typing import NamedTuple

import torch
from transformers.cache_utils import Cache, CacheLayerMixin

from interp_cache.core.attention import StoredRows
from interp_cache.core.context import ForwardContext
from interp_cache.core.hook_points import CacheHooks, run_hook
from interp_cache.cache.ragged import PADDING_POSITION, RaggedEntries, keep_from_mask
_MIN_CAPACITY = 16


class CacheRead(NamedTuple):
    """What attention reads from a layer this forward."""

    keys: torch.Tensor  # [b, g, k, d]
    values: torch.Tensor | StoredRows  # [b, g, k, d], or rows still in storage (a page-selecting read)
    positions: torch.Tensor  # [b, g, k] true positions, -1: nothing to attend
    per_head_positions: bool  # heads (or layers) hold different positions: masks per head, none shared
    has_hidden: bool  # some slots are -1 beyond the cache's padding (head-wise padding, a patch): mask them


class HookedCacheLayer(CacheLayerMixin):
    """One layer's entries: keys, values, positions; written, compressed and read through the cache hooks.

    Storage is a uniform tail `[b, g, capacity, d]`, preceded -- only after a head-wise eviction left heads
    with unequal counts -- by a `RaggedEntries` prefix that stores exactly the entries kept. Attention
    reads prefix then tail. A compression policy (`interp_cache.compress`) decides in the layer's forward
    what to keep; the eviction is applied when the forward completes (`apply_pending`), so a forward that
    raises leaves the cache as it was.
    """

    is_sliding = False
    is_compileable = False
    is_croppable = True

    def __init__(self, layer_idx: int = 0, num_layers: int = 1, policy=None):
        super().__init__()
        self.layer_idx = layer_idx
        self.num_layers = num_layers
        self.policy = policy
        self.positions: torch.Tensor | None = None  # [b, g, capacity]
        self.entry_scores: torch.Tensor | None = None  # [b, g, capacity] a policy's running scores (H2O)
        self.prefix: RaggedEntries | None = None
        self.policy_state: dict[str, torch.Tensor] = {}  # batch-first tensors a policy keeps (Quest's page bounds)
        self.physical_length = 0  # entries in the tail
        self.logical_length = 0
        self.has_padding = False
        self.evicted = False  # entries were removed: heads (and layers) no longer share key positions
        self.pending: tuple | None = None  # (keep, running scores, budget) chosen in this forward, applied after it
        self.budget: int | None = None  # per-head budget of the last compression

    # -- storage -------------------------------------------------------------------------------------
    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        self.dtype, self.device = key_states.dtype, key_states.device
        b, g, _, d = key_states.shape
        self.keys = key_states.new_empty((b, g, 0, d))
        self.values = value_states.new_empty((b, g, 0, value_states.shape[-1]))
        self.positions = torch.empty((b, g, 0), dtype=torch.long, device=key_states.device)
        if self.policy is not None and self.policy.keeps_entry_scores:
            self.entry_scores = torch.zeros((b, g, 0), dtype=torch.float32, device=key_states.device)
        self.is_initialized = True

    @property
    def capacity(self) -> int:
        return 0 if self.keys is None else self.keys.shape[2]

    def _tail_tensors(self) -> list[tuple[str, object]]:
        """(attribute, fill for unused slots) of every per-entry tail tensor."""
        tensors = [("keys", None), ("values", None), ("positions", PADDING_POSITION)]
        if self.entry_scores is not None:
            tensors.append(("entry_scores", 0.0))
        return tensors

    def _resize_tail(self, new_capacity: int) -> None:
        n = self.physical_length
        for name, fill in self._tail_tensors():
            old = getattr(self, name)
            shape = list(old.shape)
            shape[2] = new_capacity
            new = old.new_full(shape, fill) if fill is not None else old.new_empty(shape)
            new[:, :, :n] = old[:, :, :n]
            setattr(self, name, new)

    def _reserve(self, needed: int) -> None:
        if needed <= self.capacity:
            return
        # 1.5x growth: amortised O(1) appends with at most a third of the storage spare, so a compressed
        # cache that decodes on does not double its bytes on the first new token. Whole multiples of 16
        # entries, so pages of 16 (Quest) tile the storage and can be gathered as blocks.
        grown = max(needed, self.capacity + self.capacity // 2, _MIN_CAPACITY)
        self._resize_tail(-(-grown // _MIN_CAPACITY) * _MIN_CAPACITY)

    def append(self, keys_bgpd: torch.Tensor, values_bgpd: torch.Tensor, positions_bgp: torch.Tensor) -> None:
        if not self.is_initialized:
            self.lazy_initialization(keys_bgpd, values_bgpd)
        p = keys_bgpd.shape[2]
        start = self.physical_length
        self._reserve(start + p)
        self.keys[:, :, start : start + p] = keys_bgpd
        self.values[:, :, start : start + p] = values_bgpd
        self.positions[:, :, start : start + p] = positions_bgp
        if self.entry_scores is not None:
            self.entry_scores[:, :, start : start + p] = 0.0
        self.physical_length = start + p
        self.logical_length += p

    def read(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Keys, values `[b, g, k, d]` and positions `[b, g, k]` of the stored entries (views unless head-wise)."""
        n = self.physical_length
        tail = self.keys[:, :, :n], self.values[:, :, :n], self.positions[:, :, :n]
        if self.prefix is None:
            return tail
        keys, values, positions, _ = self.prefix.padded()
        return (torch.cat([keys, tail[0]], 2), torch.cat([values, tail[1]], 2), torch.cat([positions, tail[2]], 2))

    def read_entry_scores(self) -> torch.Tensor | None:
        """The policy's running scores `[b, g, k]`, aligned with `read()`."""
        if self.entry_scores is None:
            return None
        tail = self.entry_scores[:, :, : self.physical_length]
        if self.prefix is None or self.prefix.scores_n is None:
            return tail
        return torch.cat([self.prefix.padded()[3], tail], 2)

    @property
    def irregular(self) -> bool:
        """Entries were evicted: key positions differ between heads and have holes, so masks are per head."""
        return self.evicted or self.prefix is not None

    def kept_counts(self) -> torch.Tensor:
        """`[b, g]` entries each head stores (padding entries included)."""
        if not self.is_initialized:
            raise ValueError(f"layer {self.layer_idx} holds no entries yet: run a forward on this cache first")
        b, g = self.positions.shape[:2]
        counts = torch.full((b, g), self.physical_length, dtype=torch.long, device=self.positions.device)
        return counts if self.prefix is None else counts + self.prefix.counts_bg

    def truncate(self, physical_length: int, logical_length: int) -> None:
        self.physical_length = physical_length
        self.logical_length = logical_length
        if self.positions is not None:
            self.positions[:, :, physical_length:] = PADDING_POSITION

    # -- eviction ------------------------------------------------------------------------------------
    def retain(self, keep_bgn: torch.Tensor, entry_scores_bgk: torch.Tensor | None = None) -> None:
        """Keep, per head, the entries of `read()` whose indices `keep_bgn` lists (-1: none); drop the rest.

        Heads that keep equally many entries stay a uniform tail; unequal counts become a ragged prefix
        holding exactly the kept entries (no padding to the longest head).
        """
        keys, values, positions = self.read()
        scores = entry_scores_bgk if entry_scores_bgk is not None else self.read_entry_scores()
        k = positions.shape[-1]
        kept = keep_bgn >= 0
        # Kept entries first, in stored order, so a head's count is a prefix of its row.
        order_bgn = torch.where(kept, keep_bgn, k).sort(dim=-1).values
        kept = order_bgn < k
        index_bgn = order_bgn.masked_fill(~kept, 0)
        d_index = index_bgn[..., None]
        keys = keys.gather(2, d_index.expand(-1, -1, -1, keys.shape[-1]))
        values = values.gather(2, d_index.expand(-1, -1, -1, values.shape[-1]))
        positions = positions.gather(2, index_bgn).masked_fill(~kept, PADDING_POSITION)
        scores = None if scores is None else scores.gather(2, index_bgn)
        counts = kept.sum(-1)
        self.evicted = True
        if bool((counts == counts.flatten()[0]).all()):
            n = int(counts.flatten()[0]) if counts.numel() else 0
            self.prefix = None
            new_tail = {"keys": keys[:, :, :n], "values": values[:, :, :n], "positions": positions[:, :, :n]}
            if scores is not None:
                new_tail["entry_scores"] = scores[:, :, :n]
            self._replace_tail(new_tail, n)
        else:
            # Padding entries are never visible: a ragged prefix does not keep them.
            self.prefix = RaggedEntries.from_padded(keys, values, positions, scores, kept & (positions >= 0))
            empty = {name: getattr(self, name)[:, :, :0] for name, _ in self._tail_tensors()}
            self._replace_tail(empty, 0)
        if self.policy is not None:
            self.policy.after_write(self, 0)  # page bounds follow the entries that moved

    def _replace_tail(self, tensors: dict[str, torch.Tensor], n: int) -> None:
        # Policies that evict on every decode step (H2O, StreamingLLM) reuse their storage: no reallocation
        # per step. One-shot compression (after the prefill) shrinks the storage, so the bytes really fall.
        if self.policy is not None and self.policy.evicts_during_decoding and self.capacity >= n:
            for name, value in tensors.items():
                getattr(self, name)[:, :, :n] = value
        else:
            for name, value in tensors.items():
                setattr(self, name, value.clone(memory_format=torch.contiguous_format))
        self.physical_length = n
        self.positions[:, :, n:] = PADDING_POSITION

    def overwrite(self, keys_bgkd: torch.Tensor, values_bgkd: torch.Tensor, positions_bgk: torch.Tensor) -> None:
        """Replace the stored entries with an edited copy of `read()` (same shapes): cache patching."""
        m = 0 if self.prefix is None else self.prefix.max_count
        if self.prefix is not None:
            present = self.prefix.padded()[2] >= 0
            scores = self.read_entry_scores()
            self.prefix = RaggedEntries.from_padded(
                keys_bgkd[:, :, :m], values_bgkd[:, :, :m], positions_bgk[:, :, :m],
                None if scores is None else scores[:, :, :m], present,
            )
        n = self.physical_length
        self.keys[:, :, :n] = keys_bgkd[:, :, m:]
        self.values[:, :, :n] = values_bgkd[:, :, m:]
        self.positions[:, :, :n] = positions_bgk[:, :, m:]
        if self.policy is not None:
            self.policy.after_write(self, 0)  # page bounds and the like follow the new keys

    def apply_pending(self) -> None:
        """Carry out the keep-set the policy chose during the forward that just completed."""
        if self.pending is None:
            return
        keep, scores, budget = self.pending
        self.pending = None
        if keep is not None:
            self.retain(keep, scores)
            self.budget = budget
        elif scores is not None:
            self.set_entry_scores(scores)

    def set_entry_scores(self, scores_bgk: torch.Tensor) -> None:
        if self.prefix is not None:
            m = self.prefix.max_count
            keys, values, positions, _ = self.prefix.padded()
            self.prefix = RaggedEntries.from_padded(keys, values, positions, scores_bgk[:, :, :m], positions >= 0)
            scores_bgk = scores_bgk[:, :, m:]
        self.entry_scores[:, :, : self.physical_length] = scores_bgk

    # -- the write -> policy -> read path used by the attention core ---------------------------------
    def write_and_read(
        self,
        keys_bgpd: torch.Tensor,
        values_bgpd: torch.Tensor,
        context: ForwardContext,
        hooks: CacheHooks,
        query_bhpd: torch.Tensor | None = None,
        spec=None,
    ) -> CacheRead:
        """Append this forward's entries; return what attention reads."""
        keys_bgpd = run_hook(hooks.hook_k_write, keys_bgpd, context)
        values_bgpd = run_hook(hooks.hook_v_write, values_bgpd, context)
        b, g, p, _ = keys_bgpd.shape
        start = self.physical_length
        self.append(keys_bgpd, values_bgpd, context.stored_positions[:, None, :].expand(b, g, p))
        self.has_padding = self.has_padding or context.has_padding
        per_head, hidden = self.irregular, self.prefix is not None
        selection = None
        if self.policy is not None:
            self.policy.after_write(self, start)
            selection = self.policy.select_for_read(self, query_bhpd, spec, context, hooks)
        if selection is None:
            keys, values, positions = self.read()
        else:
            keys, values, positions, selection_hides = selection
            per_head, hidden = True, hidden or selection_hides
        if hooks.hook_positions.is_hooked():
            positions = run_hook(hooks.hook_positions, positions, context, key_positions=positions)
            per_head = hidden = True  # a patched position can hide an entry or differ between heads
        keys = run_hook(hooks.hook_k_read, keys, context, key_positions=positions)
        if hooks.hook_v_read.is_hooked() and isinstance(values, StoredRows):
            # The hook sees the values; attention mixes them from storage unless the hook replaced them,
            # so a hook that only reads (or patches another step) leaves the arithmetic bit for bit alone.
            stored, values = values, values.materialize()
            patched = run_hook(hooks.hook_v_read, values, context, key_positions=positions)
            values = stored if patched is values else patched
        else:
            values = run_hook(hooks.hook_v_read, values, context, key_positions=positions)
        return CacheRead(keys, values, positions, per_head, hidden)

    def after_attention(
        self,
        query_bhpd: torch.Tensor,
        keys_bgkd: torch.Tensor,
        positions_bgk: torch.Tensor,
        spec,
        context: ForwardContext,
        hooks: CacheHooks,
    ) -> None:
        """Let an eviction policy choose what this layer keeps; applied when the forward completes."""
        if self.policy is not None:
            self.pending = self.policy.decide_eviction(self, query_bhpd, keys_bgkd, positions_bgk, spec, context, hooks)

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
        self.keys = self.values = self.positions = self.entry_scores = None
        self.prefix = None
        self.policy_state = {}
        self.is_initialized = False
        self.physical_length = self.logical_length = 0
        self.has_padding = self.evicted = False
        self.pending = None

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        self.batch_select_indices(beam_idx)

    def _map_batch(self, tensor_fn, ragged_fn) -> None:
        if not self.is_initialized:
            return
        for name, _ in self._tail_tensors():
            setattr(self, name, tensor_fn(getattr(self, name)))
        self.policy_state = {name: tensor_fn(value) for name, value in self.policy_state.items()}
        if self.prefix is not None:
            self.prefix = ragged_fn(self.prefix)

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        if self.is_initialized:
            indices = indices.to(self.keys.device)
        self._map_batch(lambda t: t.index_select(0, indices), lambda r: r.batch_select(indices))

    def batch_repeat_interleave(self, repeats: int) -> None:
        self._map_batch(lambda t: t.repeat_interleave(repeats, dim=0), lambda r: r.repeat_interleave(repeats))

    def crop(self, tokens_to_remove: int) -> None:
        if tokens_to_remove > 0:
            tokens_to_remove = self.logical_length - tokens_to_remove
        if tokens_to_remove == 0:
            return
        removed = abs(tokens_to_remove)
        if self.irregular or self.physical_length != self.logical_length:
            raise ValueError(
                f"cannot rewind/crop layer {self.layer_idx}: a compression policy evicted entries, so the last "
                "token slots are no longer all stored; fork() the cache before the step you want to return to"
            )
        self.truncate(self.physical_length - removed, self.logical_length - removed)

    @property
    def nbytes(self) -> int:
        """Bytes of every tensor this layer holds: tail storage (spare capacity included), prefix, policy state."""
        if not self.is_initialized:
            return 0
        tensors = [getattr(self, name) for name, _ in self._tail_tensors()] + list(self.policy_state.values())
        total = sum(t.numel() * t.element_size() for t in tensors)
        return total + (0 if self.prefix is None else self.prefix.nbytes)


class HookedCache(Cache):
    """A KV cache with true positions per entry, logical vs physical length and amortised growth.

    `policy` (from `interp_cache.compress`) compresses it: every layer consults it when entries are written
    (selection policies choose what attention reads) and after attention (eviction policies choose what
    stays); evictions take effect when the forward completes.
    """

    def __init__(self, num_layers: int, policy=None):
        super().__init__(layers=[HookedCacheLayer(i, num_layers, policy) for i in range(num_layers)])
        self.policy = policy
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
        if self.policy is not None:
            for layer in self.layers:
                layer.apply_pending()

    def snapshot_lengths(self) -> list[tuple[int, int]]:
        return [(layer.physical_length, layer.logical_length) for layer in self.layers]

    def rollback(self, lengths: list[tuple[int, int]]) -> None:
        """Undo the writes of a forward that raised, so a failed step leaves the cache as it was."""
        for layer, (physical, logical) in zip(self.layers, lengths):
            layer.truncate(physical, logical)
            layer.pending = None

    # -- what users ask of a cache -------------------------------------------------------------------
    @property
    def logical_length(self) -> int:
        return self.layers[0].logical_length

    @property
    def physical_lengths(self) -> list[int]:
        """Per layer, the entries attention reads per head (the longest head where heads differ)."""
        return [0 if not layer.is_initialized else int(layer.kept_counts().max()) for layer in self.layers]

    def kept_counts(self) -> torch.Tensor:
        """`[layers, b, g]` entries each head of each layer stores: the head-wise budgets actually in use."""
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

    # -- cache patching between steps ----------------------------------------------------------------
    def _entry_selection(self, layer_idx: int, positions, heads, rows) -> tuple[torch.Tensor, torch.Tensor]:
        """`[b, g, k]` mask of the stored entries at absolute `positions` (all real ones if None) of the chosen
        KV heads and batch rows, and the positions read."""
        if not 0 <= layer_idx < len(self.layers):
            raise ValueError(f"layer must be in [0, {len(self.layers)}); got {layer_idx}")
        layer = self.layers[layer_idx]
        if not layer.is_initialized:
            raise ValueError(f"layer {layer_idx} holds no entries yet: run a forward on this cache first")
        stored = layer.read()[2]
        b, g, _ = stored.shape
        chosen = stored >= 0
        if positions is not None:
            wanted = torch.as_tensor(list(positions) if not isinstance(positions, torch.Tensor) else positions,
                                     dtype=torch.long, device=stored.device).reshape(-1)
            chosen &= (stored[..., None] == wanted).any(-1)
        for name, index, size, axis in (("heads", heads, g, 1), ("rows", rows, b, 0)):
            if index is None:
                continue
            index = [index] if isinstance(index, int) else list(index)
            if any(not 0 <= i < size for i in index):
                raise ValueError(f"{name} must be in [0, {size}); got {index}")
            keep = torch.zeros(size, dtype=torch.bool, device=stored.device)
            keep[index] = True
            chosen &= keep.view([-1 if a == axis else 1 for a in range(3)])
        return chosen, stored

    def read_entries(self, layer_idx: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Copies of layer `layer_idx`'s keys, values `[b, g, k, d]` and true positions `[b, g, k]` (-1: none)."""
        return tuple(t.clone() for t in self.layers[layer_idx].read())

    def replace_entries(
        self,
        layer_idx: int,
        positions=None,
        keys: torch.Tensor | None = None,
        values: torch.Tensor | None = None,
        new_positions: int | torch.Tensor | None = None,
        heads=None,
        rows=None,
    ) -> int:
        """Overwrite the key/value (and/or the stored position) of the entries at absolute `positions`.

        `keys` / `values` are either full `[b, g, k, d]` tensors aligned with `read_entries` (their selected
        entries are copied in) or a `[d]` vector written into every selected entry. Keys are stored after
        rotary: a replacement key must be rotated for the position it represents. Returns the entries changed.
        """
        chosen, stored = self._entry_selection(layer_idx, positions, heads, rows)
        if not bool(chosen.any()):
            raise ValueError(f"no stored entry of layer {layer_idx} matches positions={positions!r}")
        layer = self.layers[layer_idx]
        current_keys, current_values, current_positions = (t.clone() for t in layer.read())
        for name, current, new in (("keys", current_keys, keys), ("values", current_values, values)):
            if new is None:
                continue
            new = new.to(current.dtype)
            if new.shape == current.shape:
                current[chosen] = new[chosen]
            elif new.shape == current.shape[-1:]:
                current[chosen] = new
            else:
                raise ValueError(
                    f"{name} must have shape {tuple(current.shape)} (aligned with read_entries) or "
                    f"{tuple(current.shape[-1:])}; got {tuple(new.shape)}"
                )
        if new_positions is not None:
            new_positions = torch.as_tensor(new_positions, dtype=torch.long, device=stored.device)
            current_positions = torch.where(chosen, new_positions.expand_as(stored), current_positions)
        layer.overwrite(current_keys, current_values, current_positions)
        if new_positions is not None:
            layer.evicted = True  # positions now differ from head to head: per-head masks from here on
        return int(chosen.sum())

    def delete_entries(self, layer_idx: int, positions, heads=None, rows=None) -> int:
        """Remove the entries at absolute `positions` (of the chosen KV heads and rows); returns how many."""
        chosen, _ = self._entry_selection(layer_idx, positions, heads, rows)
        self.layers[layer_idx].retain(keep_from_mask(~chosen))
        return int(chosen.sum())

    def fork(self) -> "HookedCache":
        """An independent copy: continuations from the fork never touch this cache.

        Tensors are cloned (not deep-copied), so a cache filled with gradients enabled forks too -- and the
        fork's entries stay differentiable with respect to what produced them.
        """
        clones: dict[int, object] = {}
        seen: set[int] = set()

        def clone_tensors_in(value) -> None:
            if id(value) in seen:
                return
            seen.add(id(value))
            if isinstance(value, torch.Tensor):
                clones[id(value)] = value.clone()
            elif isinstance(value, dict):
                for item in value.values():
                    clone_tensors_in(item)
            elif isinstance(value, (list, tuple)):
                for item in value:
                    clone_tensors_in(item)
            elif hasattr(value, "__dict__") and not isinstance(value, type):
                for item in vars(value).values():
                    clone_tensors_in(item)

        clone_tensors_in(self)
        return copy.deepcopy(self, clones)

    def rewind(self, num_tokens: int) -> None:
        """Forget the last `num_tokens` token slots (decode steps), e.g. to try another continuation."""
        if num_tokens < 0 or num_tokens > self.logical_length:
            raise ValueError(f"rewind needs 0 <= num_tokens <= {self.logical_length}; got {num_tokens}")
        if num_tokens == 0:
            return
        evicted = [layer.layer_idx for layer in self.layers if layer.irregular]
        if evicted:
            raise ValueError(
                f"cannot rewind: compression evicted entries in layers {evicted}, so the last token slots are no "
                "longer all stored; fork() the cache before the step you want to return to"
            )
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
