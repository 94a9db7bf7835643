"""The contract between a cache layer and a compression policy: what the policy sees, what it returns.

A cache layer consults its policy at two decision points of every forward (`interp_cache.cache.layer`):

* before attention, to choose what attention reads (a *selection* policy: Quest): `propose_read` scores
  candidates (pages), `choose_read` turns the -- possibly hook-patched -- scores into the entries read;
* after attention, to choose what stays (an *eviction* policy): `propose_eviction` scores every entry
  read and names the budget, `choose_keep` turns the -- possibly patched -- scores into a keep-set.

At both points the policy gets an `Observation`: a read-only view of this forward's queries and the
entries in question. It never touches storage and never fires hooks: the layer fires
`blocks.{i}.cache.hook_scores` between the two calls and `hook_keep` on the choice, then carries out
the (possibly patched) decision. A policy that keeps state of its own (Quest's page bounds) updates it in
`track_writes`, shown a read-only view of the stored entries after each write.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from functools import cached_property
from typing import Protocol

import torch

from interp_cache.cache.storage import Arrangement, StoredEntries
from interp_cache.core.attention import AttentionSpec
from interp_cache.core.received import received_attention
from interp_cache.core.context import ForwardContext


@dataclass(frozen=True)
class Observation:
    """What a layer's policy sees at a decision point: this forward's queries and the entries in question.

    At the eviction point the entries are those attention read; at the selection point, the stored tail.
    """

    layer_idx: int
    num_layers: int
    context: ForwardContext
    spec: AttentionSpec
    query_bhpd: torch.Tensor
    keys_bgkd: torch.Tensor
    positions_bgk: torch.Tensor
    arrangement: Arrangement
    has_invisible_slots: bool  # some entry in question is padding or a head-wise hole (position -1)
    entry_scores_bgk: torch.Tensor | None  # the running per-entry scores the cache keeps for the policy (H2O)
    policy_state: Mapping[str, torch.Tensor]  # the policy's own per-layer tensors (Quest's page bounds)
    received_bhk: torch.Tensor | None = None  # attention's own sum over every real query (`attend_and_receive`)

    @property
    def num_entries(self) -> int:
        return self.positions_bgk.shape[-1]

    @cached_property
    def real_entries(self) -> list[int]:
        """Per batch row, the real (non-padding) entries in question, the most any head holds: what budgets and
        windows resolve over, so that they do not depend on a row's batch neighbours."""
        if not self.has_invisible_slots:  # every entry is real: no count to read back from the tensor
            return [self.num_entries] * self.positions_bgk.shape[0]
        return (self.positions_bgk >= 0).sum(-1).amax(-1).tolist()

    def attention_received(self, last_queries: int | None = None) -> torch.Tensor:
        """`[b, g, k]` float32: attention each entry received, summed over this forward's (last n) real
        queries, averaged over the query heads that share the KV head (GQA)."""
        p = self.context.num_new
        first = 0 if last_queries is None else max(0, p - last_queries)
        received_bhk = self.received_bhk if first == 0 else None
        if received_bhk is None:
            received_bhk = received_attention(
                self.query_bhpd[:, :, first:], self.keys_bgkd, self.positions_bgk, self.spec,
                self.context.positions[:, first:], p, ~self.context.is_padding[:, first:], first_query_index=first,
            )
        b, h, k = received_bhk.shape
        return received_bhk.view(b, self.keys_bgkd.shape[1], -1, k).mean(2)


@dataclass(frozen=True)
class Proposal:
    """A policy's scores at a decision point, before `hook_scores` may overwrite them."""

    scores: torch.Tensor | None  # [b, g, n]: per entry (eviction) or per page (selection); None: nothing to decide
    budget: int | None = None  # entries per head an eviction keeps
    running_scores: torch.Tensor | None = None  # [b, g, k] per-entry scores to store, aligned with the entries read


@dataclass(frozen=True)
class ReadChoice:
    """The tail entries a selecting read takes: `index_bgn` (-1 hides a slot); when they are exactly the
    whole pages `pages_bgm` of `page_size` entries (cut at the read's length), storage copies them as blocks."""

    index_bgn: torch.Tensor
    pages_bgm: torch.Tensor | None = None
    page_size: int | None = None


class CachePolicy(Protocol):
    """What a cache layer calls on its policy (`interp_cache.compress.base.CompressionPolicy` implements it)."""

    keeps_entry_scores: bool  # the storage keeps a running score per entry (H2O)
    scores_with_received_attention: bool  # its decision reads `attention_received()` over every query (H2O)

    def storage_headroom(self) -> int | None:
        """Entries the storage keeps room for beyond those kept after an eviction (None: none, shrink)."""
        ...

    def track_writes(self, layer_idx: int, num_layers: int, stored: StoredEntries, start: int, state: dict) -> None: ...

    def propose_read(self, obs: Observation) -> Proposal | None: ...

    def choose_read(self, scores: torch.Tensor, obs: Observation) -> ReadChoice: ...

    def propose_eviction(self, obs: Observation) -> Proposal | None: ...

    def single_pass_forward(self, obs: Observation) -> bool: ...

    def choose_keep(self, scores_bgk: torch.Tensor, budget: int) -> torch.Tensor: ...
