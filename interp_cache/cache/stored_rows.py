"""Values left in the cache's storage: rows of a flat `[n, d]` view, not yet copied out.

A page-selecting read (Quest) hands values this way, so a single-token decode step mixes them straight
from storage (`embedding_bag` over the selected rows) instead of copying the rows out and reading them
again. Anything else that needs the values as a tensor calls `materialize`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from interp_cache.core.attention import kv_to_query_heads


@dataclass(frozen=True)
class StoredRows:
    """Values `[b, g, k, d]`: rows `rows_bgk` of `storage_nd`."""

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

    def mix(self, pattern_bhpk: torch.Tensor, num_heads: int) -> torch.Tensor:
        """`pattern @ values` for p == 1 as one weighted bag of storage rows per query head: `[b, h, 1, d]`."""
        b, g, k = self.rows_bgk.shape
        rows_bhk = kv_to_query_heads(self.rows_bgk, num_heads)
        offsets = torch.arange(0, b * num_heads * k, k, device=rows_bhk.device)
        mixed = F.embedding_bag(
            rows_bhk.reshape(-1), self.storage_nd, offsets, mode="sum", per_sample_weights=pattern_bhpk.reshape(-1)
        )
        return mixed.view(b, num_heads, 1, -1)
