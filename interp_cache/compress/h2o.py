"""H2O (Zhang et al., 2023): heavy hitters by accumulated attention plus the `recent` newest tokens.

Each entry's score is the attention it has received, summed over every query that has read it so far
(averaged over the query heads of its KV head); the cache keeps that running score per entry, carried
through evictions. Evicts once a head holds more than `heavy + recent + slack` entries, back to `heavy +
recent`: `slack=0` (the default) is the paper's rule, an eviction on every decode step; a slack evicts in
blocks (the scores keep accumulating on every step either way).

Once a layer has evicted, attention hands each forward's received attention over from its own pass
(`interp_cache.core.received`) instead of forming the weights a second time. `single_pass_prefill=True` does
so in the evicting prefill too: 1.2-1.35x a plain prefill's time instead of 1.55-1.65x (2048 tokens, benchmarks/),
but that prefill's output then differs from an uncompressed prefill's in the last bits, so a prefill under H2O
is no longer the uncompressed one and `decoding.replay` does not reproduce it bit for bit. Off by default.
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
    single_pass_prefill: bool = False

    evicts_during_decoding = True
    keeps_entry_scores = True
    scores_with_received_attention = True

    def __post_init__(self):
        check_int(self.heavy, "H2O heavy", 0)
        check_int(self.recent, "H2O recent", 0)
        check_int(self.slack, "H2O slack", 0)
        if not isinstance(self.single_pass_prefill, bool):
            raise ValueError(f"H2O single_pass_prefill must be True or False; got {self.single_pass_prefill!r}")
        if self.heavy + self.recent < 1:
            raise ValueError("H2O heavy + recent (the budget) must be >= 1; got 0")

    @classmethod
    def covering(cls, num_tokens):
        return cls(heavy=num_tokens, recent=4)

    def eviction_slack(self):
        return self.slack

    def layer_budget(self, layer_idx, num_layers, num_entries):
        return self.heavy + self.recent

    def single_pass_forward(self, obs: Observation) -> bool:
        return self.single_pass_prefill and self.compresses_now(obs.context) and self.row_budgets(obs) is not None

    def running_scores(self, obs: Observation):
        return obs.entry_scores_bgk + obs.attention_received()

    def scores(self, obs: Observation, running_bgk):
        return protect_recent(running_bgk, obs.positions_bgk, self.recent)
