"""H2O (Zhang et al., 2023): heavy hitters by accumulated attention plus the `recent` newest tokens.

Each entry's score is the attention it has received, summed over every query that has read it so far
(averaged over the query heads of its KV head); the cache keeps that running score per entry, carried
through evictions. Evicts once a head holds more than `heavy + recent + slack` entries, back to `heavy +
recent`: `slack=0` (the default) is the paper's rule, an eviction on every decode step; a slack evicts in
blocks (the scores keep accumulating on every step either way).
"""

from __future__ import annotations

from dataclasses import dataclass

from interp_cache.compress.base import (
    EvictionPolicy,
    Observation,
    check_int,
    protect_recent,
)


@dataclass
class H2O(EvictionPolicy, name="h2o"):
    heavy: int = 128
    recent: int = 128
    slack: int = 0

    evicts_during_decoding = True
    keeps_entry_scores = True

    def __post_init__(self):
        check_int(self.heavy, "H2O heavy", 0)
        check_int(self.recent, "H2O recent", 0)
        check_int(self.slack, "H2O slack", 0)
        if self.heavy + self.recent < 1:
            raise ValueError("H2O heavy + recent (the budget) must be >= 1; got 0")

    @classmethod
    def covering(cls, num_tokens):
        return cls(heavy=num_tokens, recent=4)

    def eviction_slack(self):
        return self.slack

    def layer_budget(self, layer_idx, num_layers, num_entries):
        return self.heavy + self.recent

    def running_scores(self, obs: Observation):
        return obs.entry_scores_bgk + obs.attention_received()

    def scores(self, obs: Observation, running_bgk):
        return protect_recent(running_bgk, obs.positions_bgk, self.recent)
