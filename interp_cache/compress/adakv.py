"""AdaKV (Feng et al., 2024): one layer budget split unevenly across heads by a global top-k.

The base policy's scores of all KV heads of a layer are flattened and the layer's `budget * heads`
highest entries are kept, so heads whose attention is spread out keep more and concentrated heads
fewer. The safeguard `alpha` first guarantees every head its own top `int(alpha * budget)` entries.
GQA: the base already reduces scores per KV head. The unequal counts are stored compactly
(`interp_cache.cache.ragged`), so the cache's bytes fall with the budget.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from interp_cache.cache.ragged import keep_from_mask
from interp_cache.compress.base import EvictionPolicy, Observation, keep_ranked, ranked, scores_once
from interp_cache.compress.registry import policy_classes
from interp_cache.compress.snapkv import SnapKV


@dataclass
class AdaKV(EvictionPolicy, name="adakv"):
    base: EvictionPolicy = field(default_factory=SnapKV)
    alpha: float = 0.2

    wraps = "base"

    def __post_init__(self):
        if not scores_once(type(self.base)):
            accepted = [cls.__name__ for cls in policy_classes() if scores_once(cls)]
            raise ValueError(
                f"AdaKV base must be a one-shot scoring policy ({', '.join(accepted)}); got {type(self.base).__name__}"
            )
        if isinstance(self.alpha, bool) or not isinstance(self.alpha, (int, float)) or not 0.0 <= self.alpha <= 1.0:
            raise ValueError(f"AdaKV alpha (the per-head safeguard fraction) must be in [0, 1]; got {self.alpha!r}")

    @classmethod
    def covering(cls, num_tokens):
        return cls(SnapKV.covering(num_tokens))

    def compresses_now(self, context):
        return self.base.compresses_now(context)

    def layer_budget(self, layer_idx, num_layers, num_entries):
        return self.base.layer_budget(layer_idx, num_layers, num_entries)

    def scores(self, obs: Observation, running_bgk):
        return self.base.scores(obs, running_bgk)

    def choose_keep(self, scores_bgk: torch.Tensor, budget: int | torch.Tensor) -> torch.Tensor:
        """Per row, the `budget * heads` highest scores of the layer (each head's top `alpha * budget` first).
        `budget` is one int, or `[b, g]` where rows differ (ratio budgets over each row's real entries)."""
        b, g, k = scores_bgk.shape
        per_row = budget[:, 0] if isinstance(budget, torch.Tensor) else torch.full((b,), budget)
        # float64, as Python's int(alpha * budget): float32 would round 0.7 * 10 down to 6
        safe_b = (self.alpha * per_row.to(torch.float64)).long()
        if bool((safe_b > 0).any()):
            boosted = keep_ranked(scores_bgk, safe_b[:, None].expand(b, g))  # padding (-inf) stays last
            # finfo.max, not inf: below the base's protected entries (+inf), above every ordinary score.
            scores_bgk = torch.where(boosted, scores_bgk.clamp(min=torch.finfo(scores_bgk.dtype).max), scores_bgk)
        if isinstance(budget, torch.Tensor):
            return keep_from_mask(keep_ranked(scores_bgk.reshape(b, g * k), per_row * g).view(b, g, k))
        chosen = ranked(scores_bgk.reshape(b, g * k), budget * g)
        keep_bk = torch.zeros(b, g * k, dtype=torch.bool, device=scores_bgk.device).scatter_(1, chosen, True)
        return keep_from_mask(keep_bk.view(b, g, k))
