"""Random: a uniformly random keep-set per head, the floor every scoring policy should beat.

Reproducible: each entry's draw is a hash of `seed`, the layer, the decode step, the KV head and the
entry's true position -- not of its storage slot or batch row -- so a prompt keeps the same entries alone
or left-padded beside others. Compresses after multi-token forwards (the prefill).
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
        positions = obs.positions_bgk
        heads = torch.arange(positions.shape[1], device=positions.device)[None, :, None]
        key = ((self.seed * 1_000_003 + obs.layer_idx) * 1_000_033 + obs.context.step) * 1_000_037
        return uniform_hash(positions * 65_537 + heads + key)


def _signed(constant: int) -> int:
    return constant - (1 << 64) if constant >= 1 << 63 else constant


_GOLDEN, _MIX1, _MIX2 = (_signed(c) for c in (0x9E3779B97F4A7C15, 0xBF58476D1CE4E5B9, 0x94D049BB133111EB))


def uniform_hash(keys: torch.Tensor) -> torch.Tensor:
    """A float in [0, 1) per int64 key (splitmix64 finalizer; int64 arithmetic wraps): same key, same value."""
    z = keys.to(torch.int64) + _GOLDEN
    z = (z ^ (z >> 30)) * _MIX1
    z = (z ^ (z >> 27)) * _MIX2
    z = z ^ (z >> 31)
    return (z & ((1 << 53) - 1)).double().mul(2.0**-53).float()
