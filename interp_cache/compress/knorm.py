"""KNorm (Devoto et al., 2024): keep the keys of smallest L2 norm, which tend to draw the most attention.

A query-free baseline: scores are `-||k||` per entry. Compresses after multi-token forwards (the prefill).
"""

from __future__ import annotations

from dataclasses import dataclass

from interp_cache.compress.base import (
    Budget,
    EvictionPolicy,
    Observation,
    check_budget,
    resolve_budget,
)


@dataclass
class KNorm(EvictionPolicy, name="knorm"):
    budget: Budget = 256

    def __post_init__(self):
        check_budget(self.budget, "KNorm budget")

    @classmethod
    def covering(cls, num_tokens):
        return cls(budget=1.0)

    def layer_budget(self, layer_idx, num_layers, num_entries):
        return resolve_budget(self.budget, num_entries)

    def scores(self, obs: Observation, running_bgk):
        return -obs.keys_bgkd.float().norm(dim=-1)
