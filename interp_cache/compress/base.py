"""What a compression policy is, and the one decision loop every eviction policy shares.

A policy is a small dataclass of parameters attached to a `HookedCache` (`model.new_cache(compress=...)`,
`model.generate(..., compress=...)`). Each cache layer consults it at two points of every forward:

* after this forward's entries are written (`after_write`, `select_for_read`): a *selection* policy
  (Quest) keeps everything and chooses which entries attention reads this step;
* after attention (`decide_eviction`): an *eviction* policy scores the entries, fires
  `blocks.{i}.cache.hook_scores` `[b, g, k]` and `hook_keep` `[b, g, n]` (indices into what attention
  read; -1 pads heads that keep fewer), and the layer removes the rest when the forward completes.

An eviction policy defines only `scores` (higher = keep) and, if it is not "top-k per head", `select`.
Protected entries (sinks, the recent window) score +inf and padding -inf, so one top-k does the rest.
A budget at or above the number of entries never touches the cache: the identity, bit for bit.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, ClassVar

import torch

from interp_cache.core.attention import AttentionSpec, attention_probabilities
from interp_cache.core.hook_points import run_hook

if TYPE_CHECKING:
    from interp_cache.cache.hooked_cache import HookedCacheLayer
    from interp_cache.core.context import ForwardContext
    from interp_cache.core.hook_points import CacheHooks

Budget = int | float
_QUERY_CHUNK = 256  # queries per block when summing attention over a long prefill (bounds the [p, k] matrix)


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


def top_per_head(scores_bgk: torch.Tensor, budget: int) -> torch.Tensor:
    """Indices `[b, g, budget]` of each head's highest scores, ascending (stored order)."""
    return scores_bgk.topk(budget, dim=-1).indices.sort(dim=-1).values


def check_policy(policy, model) -> None:
    if not isinstance(policy, CompressionPolicy):
        raise ValueError(
            "compress must be a policy from interp_cache.compress (StreamingLLM, H2O, SnapKV, PyramidKV, AdaKV, "
            f"Quest, Random, KNorm) or None; got {type(policy).__name__}"
        )
    policy.check_model(model)


@dataclass
class Observation:
    """What a layer's policy sees after attention: this forward's queries and the entries they read."""

    layer: "HookedCacheLayer"
    query_bhpd: torch.Tensor
    keys_bgkd: torch.Tensor
    positions_bgk: torch.Tensor
    spec: AttentionSpec
    context: "ForwardContext"

    @property
    def num_entries(self) -> int:
        return self.positions_bgk.shape[-1]

    def attention_received(self, last_queries: int | None = None) -> torch.Tensor:
        """`[b, g, k]` float32: attention each entry received, summed over this forward's (last n) real
        queries, averaged over the query heads that share the KV head (GQA)."""
        p = self.context.num_new
        first = 0 if last_queries is None else max(0, p - last_queries)
        b, h = self.query_bhpd.shape[:2]
        total_bhk = torch.zeros(b, h, self.num_entries, dtype=torch.float32, device=self.keys_bgkd.device)
        for start in range(first, p, _QUERY_CHUNK):
            stop = min(p, start + _QUERY_CHUNK)
            probs_bhqk = attention_probabilities(
                self.query_bhpd[:, :, start:stop], self.keys_bgkd, self.positions_bgk, self.spec,
                self.context.positions[:, start:stop], p, first_query_index=start,
            )
            real_bq = ~self.context.is_padding[:, start:stop]
            total_bhk += (probs_bhqk * real_bq[:, None, :, None]).sum(2)
        g = self.keys_bgkd.shape[1]
        return total_bhk.view(b, g, h // g, -1).mean(2)


@dataclass
class CompressionPolicy:
    """Base of every policy. Subclasses are dataclasses of their parameters, validated in `__post_init__`."""

    evicts_during_decoding: ClassVar[bool] = False  # False: compresses after multi-token forwards only
    keeps_entry_scores: ClassVar[bool] = False  # True: the cache keeps a running score per entry for it

    def check_model(self, model) -> None:
        """Raise ValueError if this policy cannot serve `model` (a HookedModel)."""
        if not hasattr(model, "num_layers") or not hasattr(model, "family"):
            raise ValueError(f"{type(self).__name__} compresses a HookedModel's cache; got {type(model).__name__}")

    def after_write(self, layer: "HookedCacheLayer", start: int) -> None:
        """Entries were appended to `layer` from tail index `start` on."""

    def select_for_read(self, layer, query_bhpd, spec, context, hooks):
        """Entries attention reads this forward `(keys, values, positions)`, or None to read them all."""
        return None

    def decide_eviction(self, layer, query_bhpd, keys_bgkd, positions_bgk, spec, context, hooks):
        """`(keep [b, g, n] or None, running scores or None, budget)` to apply when the forward completes."""
        return None


class EvictionPolicy(CompressionPolicy):
    def compresses_now(self, context: "ForwardContext") -> bool:
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

    def select(self, scores_bgk: torch.Tensor, budget: int) -> torch.Tensor:
        return top_per_head(scores_bgk, budget)

    def decide_eviction(
        self,
        layer: "HookedCacheLayer",
        query_bhpd: torch.Tensor,
        keys_bgkd: torch.Tensor,
        positions_bgk: torch.Tensor,
        spec: AttentionSpec,
        context: "ForwardContext",
        hooks: "CacheHooks",
    ):
        if not self.compresses_now(context):
            return None
        obs = Observation(layer, query_bhpd, keys_bgkd, positions_bgk, spec, context)
        running = self.running_scores(obs)
        k = obs.num_entries
        budget = self.layer_budget(layer.layer_idx, layer.num_layers, k)
        if k <= budget:
            return None if running is None else (None, running, None)
        scores = self.scores(obs, running).masked_fill(positions_bgk < 0, -math.inf)
        scores = run_hook(hooks.hook_scores, scores, context, key_positions=positions_bgk)
        keep = self.select(scores, budget)
        keep = run_hook(hooks.hook_keep, keep, context, key_positions=positions_bgk)
        if bool(((keep < -1) | (keep >= k)).any()):
            raise ValueError(
                f"{hooks.hook_keep.name}: kept indices must be in [0, {k}) (or -1 for none); got "
                f"{int(keep.min())}..{int(keep.max())}"
            )
        return keep, running, budget


def protect_recent(scores_bgk: torch.Tensor, positions_bgk: torch.Tensor, recent: int) -> torch.Tensor:
    """Scores with each head's `recent` highest-position (newest) entries raised to +inf."""
    if recent == 0:
        return scores_bgk
    n = min(recent, positions_bgk.shape[-1])
    threshold = positions_bgk.topk(n, dim=-1).values[..., -1:]
    return scores_bgk.masked_fill((positions_bgk >= threshold) & (positions_bgk >= 0), math.inf)
