"""Random: a uniformly random keep-set per head, the floor every scoring policy should beat.

Reproducible: the draw depends only on `seed`, the layer and the decode step. Compresses after
multi-token forwards (the prefill).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from interp_cache.compress.base import (
    Budget,
    EvictionPolicy,
    Observation,
    check_budget,
    check_int,
    resolve_budget,
)


@dataclass
class Random(EvictionPolicy, name="random"):
    budget: Budget = 256
    seed: int = 0

    def __post_init__(self):
        check_budget(self.budget, "Random budget")
        check_int(self.seed, "Random seed", 0)

    @classmethod
    def covering(cls, num_tokens):
        return cls(budget=num_tokens)

    def layer_budget(self, layer_idx, num_layers, num_entries):
        return resolve_budget(self.budget, num_entries)

    def scores(self, obs: Observation, running_bgk):
        generator = torch.Generator().manual_seed(self.seed + 1_000_003 * obs.layer_idx + obs.context.step)
        return torch.rand(obs.positions_bgk.shape, generator=generator).to(obs.positions_bgk.device)
