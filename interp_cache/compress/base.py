"""What a compression policy is: a registered dataclass of validated parameters plus its scoring.

A policy is attached to a `HookedCache` (`model.new_cache(compress=...)`, `model.generate(..., compress=...)`)
and consulted by each cache layer through the contract in `interp_cache.cache.policy_interface`: it sees an
`Observation` and returns scores (`propose_*`) and a choice (`choose_*`); the layer fires the hooks and
carries the decision out.

An eviction policy defines only `layer_budget` and `scores` (higher = keep) and, if it is not "top-k per
head", `choose_keep`. Protected entries (sinks, the recent window) score +inf and padding -inf, so one
top-k does the rest. A budget at or above the number of entries never touches the cache: the identity, bit
for bit -- and every registered policy says, in `covering`, how to build that identity instance, so the
verifier checks it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import torch

from interp_cache.cache.policy_interface import Observation, Proposal, ReadChoice
from interp_cache.cache.ragged import keep_from_mask
from interp_cache.cache.storage import StoredEntries
from interp_cache.compress.registry import policy_names, register
from interp_cache.core.context import ForwardContext

Budget = int | float


def check_budget(budget: Budget, name: str = "budget") -> None:
    """A budget is a token count (int >= 1) or a ratio of the stored entries (float in (0, 1])."""
    if isinstance(budget, bool) or not isinstance(budget, (int, float)):
        raise ValueError(f"{name} must be an int token count >= 1 or a float ratio in (0, 1]; got {budget!r}")
    if isinstance(budget, int) and budget < 1:
        raise ValueError(f"{name} must be >= 1 tokens (or a float ratio in (0, 1]); got {budget}")
    if isinstance(budget, float) and not 0.0 < budget <= 1.0:
        raise ValueError(f"{name} as a ratio must be in (0, 1] (or an int token count >= 1); got {budget}")


def check_int(value, name: str, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}; got {value!r}")


def resolve_budget(budget: Budget, num_entries: int) -> int:
    """Tokens per head: the int itself, or `ceil(ratio * num_entries)` (at least 1)."""
    if isinstance(budget, float):
        return max(1, math.ceil(budget * num_entries))
    return budget


def ranked(scores: torch.Tensor, count: int) -> torch.Tensor:
    """Indices of the `count` highest scores along the last axis, ties to the older entry (lower index).

    `topk` breaks ties as its kernel happens to, which changes with the tensor's length: a max-pooled
    plateau of equal scores then kept different entries for a prompt alone and the same prompt left-padded
    beside a longer one. Padding shifts every real entry's index alike, so "lower index first" is the same
    choice in both."""
    return scores.argsort(dim=-1, descending=True, stable=True)[..., :count]


def keep_ranked(scores: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    """Bool mask over the last axis: each slice's `counts` highest scores (ties to the older), never one at -inf
    (padding). `counts` has the shape of `scores` without its last axis."""
    order = ranked(scores, min(int(counts.max()), scores.shape[-1]))
    chosen = torch.arange(order.shape[-1], device=scores.device) < counts[..., None].to(scores.device)
    chosen &= scores.gather(-1, order) > -math.inf
    return torch.zeros_like(scores, dtype=torch.bool).scatter_(-1, order, chosen)


def top_per_head(scores_bgk: torch.Tensor, budget: int) -> torch.Tensor:
    """Indices `[b, g, budget]` of each head's highest scores (ties to the older), ascending (stored order):
    `ranked(scores, budget).sort().values`, without sorting every score -- a decode step of Quest at 32K
    entries spent 2 of its 13 ms in that sort. Everything above the budget-th score is kept, and of the
    scores equal to it, the oldest."""
    n = scores_bgk.shape[-1]
    if budget >= n:
        return torch.arange(n, device=scores_bgk.device).expand(*scores_bgk.shape[:-1], n).contiguous()
    if budget == n - 1:
        # One entry out (a decode step under a per-step rule): the lowest score, of equal ones the newest.
        # Index `budget - from_end` is dropped: slots from there on keep the entry one further on.
        from_end_bg1 = scores_bgk.flip(-1).argmin(-1, keepdim=True)
        kept = torch.arange(budget, device=scores_bgk.device)
        return kept + (kept + from_end_bg1 >= budget)
    threshold = scores_bgk.topk(budget, dim=-1, sorted=False).values.amin(-1, keepdim=True)
    above = scores_bgk > threshold
    at_threshold = scores_bgk == threshold
    still_needed = budget - above.sum(-1, keepdim=True)
    chosen = above | (at_threshold & (at_threshold.cumsum(-1) <= still_needed))
    positions = torch.arange(n, device=scores_bgk.device).expand_as(scores_bgk)
    return positions[chosen].view(*scores_bgk.shape[:-1], budget)


def check_policy(policy, model) -> None:
    if not isinstance(policy, CompressionPolicy):
        raise ValueError(
            f"compress must be a policy from interp_cache.compress ({', '.join(policy_names())}) or None; "
            f"got {type(policy).__name__}"
        )
    policy.check_model(model)


@dataclass
class CompressionPolicy:
    """Base of every policy. Subclasses are dataclasses of their parameters, validated in `__post_init__`,
    and register under a spec name: `class SnapKV(EvictionPolicy, name="snapkv")`."""

    evicts: ClassVar[bool] = False  # True: removes entries (eviction); False: keeps them all (selection, Quest)
    evicts_during_decoding: ClassVar[bool] = False  # False: compresses after multi-token forwards only
    keeps_entry_scores: ClassVar[bool] = False  # True: the cache keeps a running score per entry for it
    # True: every forward's decision reads `obs.attention_received()` over all queries, which attention then
    # hands over from its own pass once this policy has evicted (`interp_cache.core.received`).
    scores_with_received_attention: ClassVar[bool] = False
    wraps: ClassVar[str | None] = None  # the field holding another policy this one builds on (AdaKV: "base")
    spec_name: ClassVar[str | None] = None

    def __init_subclass__(cls, name: str | None = None, **kwargs):
        super().__init_subclass__(**kwargs)
        if name is None:
            return
        if getattr(cls.covering, "__func__", None) is CompressionPolicy.covering.__func__:
            raise TypeError(f"policy {cls.__qualname__} must define covering(num_tokens), its identity instance")
        cls.spec_name = name
        register(name, cls)

    @classmethod
    def covering(cls, num_tokens: int) -> CompressionPolicy:
        """An instance whose budget covers `num_tokens` entries in every layer from layer 0 on, so it must
        change nothing, bit for bit (the verifier's `compression` row)."""
        raise NotImplementedError

    def check_model(self, model) -> None:
        """Raise ValueError if this policy cannot serve `model` (a HookedModel)."""
        if not hasattr(model, "num_layers") or not hasattr(model, "family"):
            raise ValueError(f"{type(self).__name__} compresses a HookedModel's cache; got {type(model).__name__}")

    def eviction_slack(self) -> int:
        """Entries a head may hold beyond its budget before this policy evicts it back to the budget."""
        return 0

    def storage_headroom(self) -> int | None:
        """Room a cache layer keeps beyond the entries kept after an eviction: a policy that evicts while
        decoding holds up to its slack more, plus the entry being written; one-shot compression, none."""
        return self.eviction_slack() + 1 if self.evicts_during_decoding else None

    def track_writes(self, layer_idx: int, num_layers: int, stored: StoredEntries, start: int, state: dict) -> None:
        """Entries were written to the layer's tail from index `start` on (0 after an eviction or an edit)."""

    def propose_read(self, obs: Observation) -> Proposal | None:
        """Scores of what a selecting read chooses from, or None to read every entry."""
        return None

    def choose_read(self, scores: torch.Tensor, obs: Observation) -> ReadChoice:
        raise NotImplementedError

    def propose_eviction(self, obs: Observation) -> Proposal | None:
        """Scores of the entries attention read, with the budget, or None to keep them all."""
        return None

    def single_pass_forward(self, obs: Observation) -> bool:
        """Asked before attention, on a layer not evicted from yet, by a policy that scores with received
        attention: whether attention should hand it over from its own pass this forward, at the price of
        arithmetic that differs from the uncompressed forward's in the last bits (H2O's single_pass_prefill)."""
        return False

    def choose_keep(self, scores_bgk: torch.Tensor, budget: int | torch.Tensor) -> torch.Tensor:
        """Indices `[b, g, n]` into the entries read, ascending per head, -1 after them where a head keeps fewer
        (the cache relies on that order: it does not sort them again). `budget`: entries per head,
        or `[b, g]` per row and head where they differ (ratio budgets over each row's real entries, HeadWise)."""
        if isinstance(budget, torch.Tensor):
            return keep_from_mask(keep_ranked(scores_bgk, budget))
        return top_per_head(scores_bgk, budget)


class EvictionPolicy(CompressionPolicy):
    evicts = True

    def compresses_now(self, context: ForwardContext) -> bool:
        return self.evicts_during_decoding or context.num_new > 1

    def layer_budget(self, layer_idx: int, num_layers: int, num_entries: int) -> int:
        """Entries each head of layer `layer_idx` keeps."""
        raise NotImplementedError

    def running_scores(self, obs: Observation) -> torch.Tensor | None:
        """Per-entry scores carried from step to step (H2O's accumulated attention), updated by this forward."""
        return None

    def scores(self, obs: Observation, running_bgk: torch.Tensor | None) -> torch.Tensor:
        """Importance `[b, g, k]` of every entry read; higher is kept first."""
        raise NotImplementedError

    def propose_eviction(self, obs: Observation) -> Proposal | None:
        if not self.compresses_now(obs.context):
            return None
        running = self.running_scores(obs)
        budget = self.row_budgets(obs)
        if budget is None:
            return None if running is None else Proposal(None, running_scores=running)
        scores = self.scores(obs, running)
        if obs.has_invisible_slots:  # padding (position -1) is never kept, whatever a policy scores it
            scores = scores.masked_fill(obs.positions_bgk < 0, -math.inf)
        elif scores is running:  # H2O with recent=0: a hook editing the scores in place must not edit the state
            scores = scores.clone()
        return Proposal(scores, budget, running)

    def row_budgets(self, obs: Observation) -> int | torch.Tensor | None:
        """Entries per head: one int, or `[b, g]` where rows differ. Each row's budget is resolved over its own
        real entries (padding is not counted), so a prompt's budget does not depend on its batch neighbours.
        None where every row's real entries fit its budget plus the slack: nothing is evicted, padding included."""
        counts = obs.real_entries
        budgets = [self.layer_budget(obs.layer_idx, obs.num_layers, max(1, n)) for n in counts]
        slack = self.eviction_slack()
        if all(budget + slack >= n for budget, n in zip(budgets, counts)):
            return None
        if len(set(budgets)) == 1:
            return budgets[0]
        return torch.tensor(budgets, device=obs.positions_bgk.device)[:, None].expand(-1, obs.positions_bgk.shape[1])


def scores_once(policy_class: type) -> bool:
    """An eviction policy that scores entries once, after a multi-token forward, with no running state: what
    a head-wise composition (AdaKV) can take as its base."""
    return (
        issubclass(policy_class, EvictionPolicy)
        and not policy_class.evicts_during_decoding
        and not policy_class.keeps_entry_scores
        and policy_class.wraps is None
    )


def protect_recent(scores_bgk: torch.Tensor, positions_bgk: torch.Tensor, recent: int) -> torch.Tensor:
    """Scores with each head's `recent` highest-position (newest) entries raised to +inf."""
    if recent == 0:
        return scores_bgk
    n = min(recent, positions_bgk.shape[-1])
    threshold = positions_bgk.topk(n, dim=-1).values[..., -1:]
    return scores_bgk.masked_fill((positions_bgk >= threshold) & (positions_bgk >= 0), math.inf)
