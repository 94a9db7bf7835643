"""StreamingLLM (Xiao et al., 2023): the first `sink` tokens (attention sinks) plus the `window` newest.

Evicts on every forward once a head holds more than `sink + window` entries. Positions stay the true
ones: a decode step after eviction is rotated (or ALiBi-biased) at its real position, not at the cache
length -- the re-positioning some implementations need is not needed here.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from interp_cache.compress.base import EvictionPolicy, Observation, check_int


@dataclass
class StreamingLLM(EvictionPolicy, name="streamingllm"):
    sink: int = 4
    window: int = 252

    evicts_during_decoding = True

    def __post_init__(self):
        check_int(self.sink, "StreamingLLM sink", 0)
        check_int(self.window, "StreamingLLM window", 1)

    @classmethod
    def covering(cls, num_tokens):
        return cls(sink=4, window=num_tokens)

    def layer_budget(self, layer_idx, num_layers, num_entries):
        return self.sink + self.window

    def scores(self, obs: Observation, running_bgk):
        positions = obs.positions_bgk
        recency = positions.float()
        return recency.masked_fill((positions >= 0) & (positions < self.sink), math.inf)
