"""One cache layer's storage: keys, values and the true position of every entry, and nothing about forwards.

Storage is a uniform tail `[b, g, capacity, d]` (positions `[b, g, capacity]`, -1 marks padding), preceded
-- only after a head-wise eviction left heads with unequal counts -- by a `RaggedEntries` prefix that
stores exactly the entries kept. Reads return prefix then tail. The tail grows by 1/32 in whole multiples
of 16 entries (`grown_capacity`), so appending a decode step rarely copies more than the new entries.

`arrangement` says in one word what the heads hold (see `Arrangement`); where a policy keeps a running
score per entry (H2O) the storage carries it beside the entry, through evictions; `policy_state` holds a
policy's own batch-first tensors (Quest's page bounds) so batch reordering and `nbytes` cover them.
"""

from __future__ import annotations

from enum import Enum
from typing import NamedTuple

import torch
import torch.nn.functional as F

from interp_cache.cache.ragged import RaggedEntries
from interp_cache.cache.stored_rows import StoredRows
from interp_cache.core.context import PADDING_POSITION

CAPACITY_GRANULARITY = 16


class Arrangement(Enum):
    ALIGNED = "aligned"  # entries in write order, none removed: every head (and layer) holds the same positions
    IRREGULAR = "irregular"  # a uniform tail, but entries were removed or positions edited: masks per head
    RAGGED = "ragged"  # heads hold unequal counts: a ragged prefix before the tail, -1 holes when read padded


def grown_capacity(capacity: int) -> int:
    """The capacity after one growth step: 1/32 more (at least one entry), rounded up to a whole multiple of 16
    entries so pages of 16 (Quest) tile the storage and can be gathered as blocks. Geometric growth keeps
    appends amortised O(1) -- each entry is copied about 32 times over a cache's life, a few entries per decode
    step against the thousands attention reads -- while spare capacity stays under 16 entries plus 1/32 of the
    entries held. Rounding `capacity + 16` instead gave a head that kept 2 entries 30 spare ones (PyramidKV's
    top layers after the prefill)."""
    grown = capacity + max(1, capacity // 32)
    return -(-grown // CAPACITY_GRANULARITY) * CAPACITY_GRANULARITY


class StoredEntries(NamedTuple):
    """A read-only view of the tail a policy may inspect after a write (views, not copies)."""

    keys: torch.Tensor  # [b, g, n, d]
    positions: torch.Tensor  # [b, g, n]
    has_padding: bool


class LayerStorage:
    def __init__(self, keeps_entry_scores: bool = False, evict_headroom: int | None = None):
        self.keeps_entry_scores = keeps_entry_scores
        # An eviction leaves storage for the entries kept plus `evict_headroom` more: a policy that evicts
        # while decoding (H2O, StreamingLLM) holds up to its slack beyond the budget plus the step being
        # written, so it never grows between evictions; each eviction selects the kept entries straight into
        # new storage of that size. None (one-shot compression after the prefill): storage shrinks to
        # exactly the entries kept. Either way the bytes sized at the prefill are released.
        self.evict_headroom = evict_headroom
        self.keys: torch.Tensor | None = None  # [b, g, capacity, d]
        self.values: torch.Tensor | None = None
        self.positions: torch.Tensor | None = None  # [b, g, capacity]
        self.entry_scores: torch.Tensor | None = None  # [b, g, capacity] a policy's running scores (H2O)
        self.prefix: RaggedEntries | None = None
        self.policy_state: dict[str, torch.Tensor] = {}
        self.read_buffers: dict[str, torch.Tensor] = {}  # what a selecting read copies into (`_read_buffer`)
        self.physical_length = 0  # entries in the tail
        self.has_padding = False
        self.arrangement = Arrangement.ALIGNED

    @property
    def is_initialized(self) -> bool:
        return self.keys is not None

    @property
    def capacity(self) -> int:
        return 0 if self.keys is None else self.keys.shape[2]

    def _tail_tensors(self) -> list[tuple[str, object]]:
        """(attribute, fill for unused slots) of every per-entry tail tensor."""
        tensors = [("keys", None), ("values", None), ("positions", PADDING_POSITION)]
        if self.entry_scores is not None:
            tensors.append(("entry_scores", 0.0))
        return tensors

    def _initialize(self, keys_bgpd: torch.Tensor, values_bgpd: torch.Tensor) -> None:
        b, g, _, d = keys_bgpd.shape
        self.keys = keys_bgpd.new_empty((b, g, 0, d))
        self.values = values_bgpd.new_empty((b, g, 0, values_bgpd.shape[-1]))
        self.positions = torch.empty((b, g, 0), dtype=torch.long, device=keys_bgpd.device)
        if self.keeps_entry_scores:
            self.entry_scores = torch.zeros((b, g, 0), dtype=torch.float32, device=keys_bgpd.device)

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
        self._resize_tail(max(needed, grown_capacity(self.capacity)))

    # -- writing and reading -------------------------------------------------------------------------
    def append(self, keys_bgpd: torch.Tensor, values_bgpd: torch.Tensor, positions_bgp: torch.Tensor) -> None:
        if not self.is_initialized:
            self._initialize(keys_bgpd, values_bgpd)
        p = keys_bgpd.shape[2]
        start = self.physical_length
        self._reserve(start + p)
        self.keys[:, :, start : start + p] = keys_bgpd
        self.values[:, :, start : start + p] = values_bgpd
        self.positions[:, :, start : start + p] = positions_bgp
        if self.entry_scores is not None:
            self.entry_scores[:, :, start : start + p] = 0.0
        self.physical_length = start + p

    def read(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Keys, values `[b, g, k, d]` and positions `[b, g, k]` of the stored entries (views unless ragged)."""
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

    def tail_view(self) -> StoredEntries:
        n = self.physical_length
        return StoredEntries(self.keys[:, :, :n], self.positions[:, :, :n], self.has_padding)

    def kept_counts(self) -> torch.Tensor:
        """`[b, g]` entries each head stores (padding entries included)."""
        b, g = self.positions.shape[:2]
        counts = torch.full((b, g), self.physical_length, dtype=torch.long, device=self.positions.device)
        return counts if self.prefix is None else counts + self.prefix.counts_bg

    def truncate(self, physical_length: int) -> None:
        self.physical_length = physical_length
        if self.positions is not None:
            self.positions[:, :, physical_length:] = PADDING_POSITION

    # -- gathers for a selecting read ----------------------------------------------------------------
    def gather_entries(self, index_bgn: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Keys, values `[b, g, n, d]` and positions `[b, g, n]` of tail entries `index_bgn` (-1: a hidden slot)."""
        b, g, capacity, d = self.keys.shape
        row_start = (torch.arange(b * g, device=index_bgn.device) * capacity).view(b, g, 1)
        rows_bgn = row_start + index_bgn.clamp(min=0)
        keys = StoredRows(self.keys.reshape(b * g * capacity, d), rows_bgn).materialize()
        values = StoredRows(self.values.reshape(b * g * capacity, -1), rows_bgn).materialize()
        positions = self.positions.reshape(-1)[rows_bgn].masked_fill(index_bgn < 0, PADDING_POSITION)
        return keys, values, positions

    def tiles_pages(self, page_size: int) -> bool:
        """Whether pages of `page_size` entries tile the storage, so `gather_pages` can copy them as blocks."""
        return self.capacity % page_size == 0

    def gather_pages(self, pages_bgm: torch.Tensor, page_size: int, length: int):
        """Keys `[b, g, m * page_size, d]` and positions of whole pages `pages_bgm` (ascending), the read cut at
        `length` entries, copied page by page; values stay in storage (`StoredRows`): a decode step mixes them
        from there, so the selected values are read once, not copied and read again."""
        b, g, capacity, d = self.keys.shape
        pages_per_row = capacity // page_size
        row_start = (torch.arange(b * g, device=pages_bgm.device) * pages_per_row).view(b, g, 1)
        flat = (row_start + pages_bgm).reshape(-1)
        m = pages_bgm.shape[-1]

        def blocks(name: str, storage: torch.Tensor, width: int) -> torch.Tensor:
            by_page = storage.reshape(b * g * pages_per_row, page_size * width)
            return torch.index_select(by_page, 0, flat, out=self._read_buffer(name, by_page, flat.numel()))

        keys = blocks("keys", self.keys, d).view(b, g, m * page_size, d)[:, :, :length]
        positions = blocks("positions", self.positions, 1).view(b, g, m * page_size)[:, :, :length]
        entry_rows = (flat.view(b, g, m, 1) * page_size + torch.arange(page_size, device=flat.device)).flatten(2)
        values = StoredRows(self.values.reshape(b * g * capacity, -1), entry_rows[..., :length])
        return keys, values, positions

    def _read_buffer(self, name: str, like: torch.Tensor, rows: int) -> torch.Tensor:
        """A buffer for a selecting read's copy, reused from step to step: a fresh tensor of that size per step
        costs more in page faults than the copy itself (8 of Quest's 22 ms per step at 32K entries). Like
        every read, what a step reads is valid until the cache's next forward."""
        buffer = self.read_buffers.get(name)
        if buffer is None or buffer.shape != (rows, like.shape[1]) or buffer.dtype != like.dtype:
            buffer = self.read_buffers[name] = like.new_empty((rows, like.shape[1]))
        return buffer

    # -- removing and editing entries ----------------------------------------------------------------
    def retain(self, keep_bgn: torch.Tensor, entry_scores_bgk: torch.Tensor | None = None,
               ascending: bool = False) -> None:
        """Keep, per head, the entries of `read()` whose indices `keep_bgn` lists (-1: none); drop the rest.
        `ascending`: the indices already ascend with any -1 after them, so they need no sort.

        Heads that keep equally many entries stay a uniform tail; unequal counts become a ragged prefix
        holding exactly the kept entries (no padding to the longest head).
        """
        if self.prefix is None:  # entries are rows of the tail storage itself: nothing to assemble first
            entries = {name: getattr(self, name) for name, _ in self._tail_tensors()}
        else:
            keys, values, positions = self.read()
            entries = {"keys": keys, "values": values, "positions": positions}
            if self.entry_scores is not None:
                entries["entry_scores"] = self.read_entry_scores()
        if entry_scores_bgk is not None:
            entries["entry_scores"] = entry_scores_bgk.contiguous()
        k = self.physical_length if self.prefix is None else entries["positions"].shape[-1]
        if ascending:
            index_bgn, kept = keep_bgn, keep_bgn >= 0
        else:
            # Kept entries first, in stored order, so a head's count is a prefix of its row.
            order_bgn = torch.where(keep_bgn >= 0, keep_bgn, k).sort(dim=-1).values
            kept = order_bgn < k
            index_bgn = order_bgn.masked_fill(~kept, 0)
        if bool(kept.all()):
            counts_uniform, n = True, keep_bgn.shape[-1]
        else:
            counts = kept.sum(-1)
            counts_uniform = bool((counts == counts.flatten()[0]).all())
            n = int(counts.flatten()[0]) if counts.numel() else 0
        if counts_uniform:
            self.prefix = None
            self.arrangement = Arrangement.IRREGULAR
            self._compact_tail(entries, index_bgn[:, :, :n])
            return
        # Padding entries are never visible: a ragged prefix does not keep them.
        rows_by_stride: dict[int, torch.Tensor] = {}
        chosen = {name: _rows_of(tensor, index_bgn.clamp(min=0), rows_by_stride) for name, tensor in entries.items()}
        positions = chosen["positions"].masked_fill(~kept, PADDING_POSITION)
        self.prefix = RaggedEntries.from_padded(
            chosen["keys"], chosen["values"], positions, chosen.get("entry_scores"), kept & (positions >= 0),
        )
        self.arrangement = Arrangement.RAGGED
        self._compact_tail({name: tensor[:, :, :0] for name, tensor in entries.items()}, index_bgn[:, :, :0])

    def _compact_tail(self, entries: dict[str, torch.Tensor], index_bgn: torch.Tensor) -> None:
        """New tail tensors holding `entries[b, g, index_bgn]` and room for `evict_headroom` more (none for a
        one-shot compression): each is one row select straight into its new storage -- selecting the kept rows
        and then copying them into the old storage cost a decode-step eviction a second copy per tensor."""
        n = index_bgn.shape[-1]
        spare = 0 if self.evict_headroom is None else self.evict_headroom
        if n == 0:  # nothing to select from (every entry went to a ragged prefix)
            for name, tensor in entries.items():
                setattr(self, name, tensor.new_empty((*tensor.shape[:2], spare, *tensor.shape[3:])))
        else:
            # Spare slots take a copy of each head's first row: never read, as their positions mark them padding.
            index_bgn = F.pad(index_bgn, (0, spare)) if spare else index_bgn
            rows_by_stride: dict[int, torch.Tensor] = {}
            for name, tensor in entries.items():
                setattr(self, name, _rows_of(tensor, index_bgn, rows_by_stride))
        self.physical_length = n
        if spare:
            self.positions[:, :, n:] = PADDING_POSITION

    def overwrite(self, keys_bgkd: torch.Tensor, values_bgkd: torch.Tensor, positions_bgk: torch.Tensor) -> None:
        """Replace the stored entries with an edited copy of `read()` (same shapes): cache patching.

        Positions that differ from the stored ones make the heads irregular: masks per head from here on.
        """
        positions_changed = not torch.equal(positions_bgk, self.read()[2])
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
        if positions_changed and self.arrangement is Arrangement.ALIGNED:
            self.arrangement = Arrangement.IRREGULAR

    def set_entry_scores(self, scores_bgk: torch.Tensor) -> None:
        if self.prefix is not None:
            m = self.prefix.max_count
            keys, values, positions, _ = self.prefix.padded()
            self.prefix = RaggedEntries.from_padded(keys, values, positions, scores_bgk[:, :, :m], positions >= 0)
            scores_bgk = scores_bgk[:, :, m:]
        self.entry_scores[:, :, : self.physical_length] = scores_bgk

    # -- the batch axis (beam search, num_return_sequences) -------------------------------------------
    def _map_batch(self, tensor_fn, ragged_fn) -> None:
        if not self.is_initialized:
            return
        for name, _ in self._tail_tensors():
            setattr(self, name, tensor_fn(getattr(self, name)))
        self.policy_state = {name: tensor_fn(value) for name, value in self.policy_state.items()}
        if self.prefix is not None:
            self.prefix = ragged_fn(self.prefix)

    def batch_select(self, indices: torch.Tensor) -> None:
        if self.is_initialized:
            indices = indices.to(self.keys.device)
        self._map_batch(lambda t: t.index_select(0, indices), lambda r: r.batch_select(indices))

    def batch_repeat_interleave(self, repeats: int) -> None:
        self._map_batch(lambda t: t.repeat_interleave(repeats, dim=0), lambda r: r.repeat_interleave(repeats))

    @property
    def nbytes(self) -> int:
        """Bytes of every tensor held: tail storage (spare capacity included), prefix, policy state."""
        if not self.is_initialized:
            return 0
        tensors = [getattr(self, name) for name, _ in self._tail_tensors()] + list(self.policy_state.values())
        tensors += list(self.read_buffers.values())
        total = sum(t.numel() * t.element_size() for t in tensors)
        return total + (0 if self.prefix is None else self.prefix.nbytes)


def _rows_of(entries_bgk: torch.Tensor, index_bgn: torch.Tensor, rows_by_stride: dict[int, torch.Tensor]):
    """`entries_bgk[b, g, index_bgn[b, g, n]]` (trailing dims kept) as one row select over the flat storage:
    `gather` with an index expanded over the feature axis cost 3x as much per decode-step eviction. The flat
    row numbers are shared by every tensor of the same length (`rows_by_stride`)."""
    b, g, stride = entries_bgk.shape[:3]
    rows = rows_by_stride.get(stride)
    if rows is None:
        rows_bgn = torch.arange(0, b * g * stride, stride, device=index_bgn.device).view(b, g, 1) + index_bgn
        rows = rows_by_stride[stride] = rows_bgn.reshape(-1)
    flat = entries_bgk.reshape(b * g * stride, -1)
    return flat.index_select(0, rows).view(*index_bgn.shape, *entries_bgk.shape[3:])
