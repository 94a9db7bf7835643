"""Head-wise entries of unequal count, stored back to back: what head-wise budgets (AdaKV) leave behind.

A uniform cache tensor `[b, g, k, d]` would have to be as long as the longest head, so memory would only
fall by the *smallest* head's eviction. Here the `b * g` heads' entries lie one after another in
`[n, d]` tensors (head `(row, kv_head)` first, in row-major order) with a count per head, so the bytes
are the entries kept and nothing more. Attention reads a padded `[b, g, max count, d]` view built per
forward (positions -1 in the padding, which the core masks); that view is transient, the storage is not.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property

import torch

from interp_cache.core.context import PADDING_POSITION


@dataclass
class RaggedEntries:
    keys_nd: torch.Tensor
    values_nd: torch.Tensor
    positions_n: torch.Tensor
    scores_n: torch.Tensor | None  # a policy's running per-entry scores (H2O), or None
    counts_bg: torch.Tensor  # [b, g] entries each head holds

    @classmethod
    def from_padded(
        cls,
        keys_bgkd: torch.Tensor,
        values_bgkd: torch.Tensor,
        positions_bgk: torch.Tensor,
        scores_bgk: torch.Tensor | None,
        stored_bgk: torch.Tensor,
    ) -> RaggedEntries:
        """Keep the entries where `stored_bgk` is True, each head's in their order."""
        return cls(
            keys_nd=keys_bgkd[stored_bgk],
            values_nd=values_bgkd[stored_bgk],
            positions_n=positions_bgk[stored_bgk],
            scores_n=None if scores_bgk is None else scores_bgk[stored_bgk],
            counts_bg=stored_bgk.sum(-1),
        )

    @property
    def max_count(self) -> int:
        return int(self.counts_bg.max()) if self.counts_bg.numel() else 0

    @cached_property
    def _padded_index(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Flat index `[b*g*m]` into the storage (m = max count) and the padding slots `[b*g, m]` it fills with
        entry 0: built once, since every decode step reads the prefix padded (entries are never changed in
        place: an edit or an eviction builds a new `RaggedEntries`)."""
        counts = self.counts_bg.reshape(-1)
        starts = counts.cumsum(0) - counts
        slot = torch.arange(self.max_count, device=counts.device)
        absent = slot[None, :] >= counts[:, None]
        index = (starts[:, None] + slot[None, :]).masked_fill(absent, 0)
        if self.keys_nd.shape[0] == 0:  # every head empty: nothing to index
            index, absent = index[:, :0], absent[:, :0]
        return index.reshape(-1), absent

    def padded(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """Keys, values `[b, g, m, d]`, positions `[b, g, m]` (-1 in padding slots), scores, m = max count."""
        b, g = self.counts_bg.shape
        index, absent = self._padded_index
        m = absent.shape[1]
        # `index_select` on a flat index: a [b*g, m] advanced index took 4x as long per decode step.
        keys = self.keys_nd.index_select(0, index).view(b, g, m, -1)
        values = self.values_nd.index_select(0, index).view(b, g, m, -1)
        positions = self.positions_n.index_select(0, index).view(b * g, m).masked_fill(absent, PADDING_POSITION)
        scores = None
        if self.scores_n is not None:
            scores = self.scores_n.index_select(0, index).view(b * g, m).masked_fill(absent, 0).view(b, g, m)
        return keys, values, positions.view(b, g, m), scores

    def batch_select(self, indices: torch.Tensor) -> RaggedEntries:
        keys, values, positions, scores = self.padded()
        present = positions >= 0
        pick = lambda t: None if t is None else t.index_select(0, indices)
        return RaggedEntries.from_padded(pick(keys), pick(values), pick(positions), pick(scores), pick(present))

    def repeat_interleave(self, repeats: int) -> RaggedEntries:
        keys, values, positions, scores = self.padded()
        present = positions >= 0
        rep = lambda t: None if t is None else t.repeat_interleave(repeats, dim=0)
        return RaggedEntries.from_padded(rep(keys), rep(values), rep(positions), rep(scores), rep(present))

    @property
    def nbytes(self) -> int:
        tensors = [self.keys_nd, self.values_nd, self.positions_n, self.counts_bg]
        if self.scores_n is not None:
            tensors.append(self.scores_n)
        return sum(t.numel() * t.element_size() for t in tensors)


def keep_from_mask(keep_bgk: torch.Tensor) -> torch.Tensor:
    """Indices `[b, g, n]` of the True entries per head, ascending, -1 where a head keeps fewer than n."""
    k = keep_bgk.shape[-1]
    index = torch.arange(k, device=keep_bgk.device).expand_as(keep_bgk)
    ordered = torch.where(keep_bgk, index, k).sort(dim=-1).values
    n = int(keep_bgk.sum(-1).max()) if keep_bgk.numel() else 0
    ordered = ordered[..., :n]
    return ordered.masked_fill(ordered == k, -1)
