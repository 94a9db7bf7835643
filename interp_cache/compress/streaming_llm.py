"""StreamingLLM (Xiao et al., 2023): the first `sink` tokens (attention sinks) plus the `window` newest.

Evicts once a head holds more than `sink + window + slack` entries, back to `sink + window`: `slack=0` (the
default) is the paper's rule, every decode step evicts one entry; a slack of a few dozen entries evicts in
blocks, so a decode step rarely pays for an eviction, at the price of windows that vary between `window` and
`window + slack`. Positions stay the true ones: a decode step after eviction is rotated (or ALiBi-biased)
at its real position, not at the cache length -- the re-positioning some implementations need is not
needed here.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from interp_cache.compress.base import EvictionPolicy, Observation, check_int


@dataclass
class StreamingLLM(EvictionPolicy, name="streamingllm"):
    sink: int = 4
    window: int = 252
    slack: int = 0

    evicts_during_decoding = True

    def __post_init__(self):
        check_int(self.sink, "StreamingLLM sink", 0)
        check_int(self.window, "StreamingLLM window", 1)
        check_int(self.slack, "StreamingLLM slack", 0)

    @classmethod
    def covering(cls, num_tokens):
        return cls(sink=4, window=num_tokens)

    def eviction_slack(self):
        return self.slack

    def layer_budget(self, layer_idx, num_layers, num_entries):
        return self.sink + self.window

    def scores(self, obs: Observation, running_bgk):
        positions = obs.positions_bgk  # padding (-1) is scored here too; the caller masks it out
        return positions.float().masked_fill(positions < self.sink, math.inf)
