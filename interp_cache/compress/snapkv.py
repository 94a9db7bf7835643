"""SnapKV (Li et al., 2024): what the last `window` prompt tokens attend to, pooled, decides what stays.

At the end of each multi-token forward (the prefill, or a prefill chunk) the attention of the
observation window's queries over every entry is summed over those queries, averaged over the query
heads sharing a KV head, and smoothed along the sequence with a 1-D max or average pool of width
`kernel`, so neighbours of an important token survive with it. The window's own entries are always
kept; the other `budget - window` per head are the top pooled scores. Decode steps do not compress.

`window=None` (the default) is the paper's 32 where the budget allows it and half the budget below 64
tokens, so every budget from 2 up runs with the defaults; an explicit window must be below the budget.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch.nn.functional as F

from interp_cache.compress.base import (
    Budget,
    EvictionPolicy,
    Observation,
    check_budget,
    check_int,
    resolve_budget,
)


@dataclass
class SnapKV(EvictionPolicy, name="snapkv"):
    budget: Budget = 256
    window: int | None = None
    kernel: int = 7
    pooling: str = "max"

    def __post_init__(self):
        name = type(self).__name__
        check_budget(self.budget, f"{name} budget")
        if self.window is not None:
            check_int(self.window, f"{name} window (or None: 32, or half the budget below 64)", 1)
        check_int(self.kernel, f"{name} kernel", 1)
        if self.kernel % 2 == 0:
            raise ValueError(f"{name} kernel must be odd (the pool keeps the sequence length); got {self.kernel}")
        if self.pooling not in ("max", "avg"):
            raise ValueError(f"{name} pooling must be 'max' or 'avg'; got {self.pooling!r}")
        if isinstance(self.budget, int) and self.window is not None and self.window >= self.budget:
            raise ValueError(
                f"{name} window ({self.window}) must be smaller than the budget ({self.budget}): "
                "the window is kept whole and the rest of the budget is chosen by score"
            )

    @classmethod
    def covering(cls, num_tokens):
        return cls(budget=num_tokens + 1, window=1, kernel=3)

    def window_for(self, num_entries: int) -> int:
        """The observation window at this many entries: the given one, or 32 / half the resolved budget."""
        if self.window is not None:
            return self.window
        return min(32, max(1, resolve_budget(self.budget, num_entries) // 2))

    def layer_budget(self, layer_idx, num_layers, num_entries):
        budget = resolve_budget(self.budget, num_entries)
        window = self.window_for(num_entries)
        if budget <= window and budget < num_entries:
            raise ValueError(
                f"{type(self).__name__} window ({window}) must be smaller than the budget, which resolved "
                f"to {budget} tokens ({self.budget} of {num_entries} entries)"
            )
        return budget

    def scores(self, obs: Observation, running_bgk):
        # Each row's window from its own real entries (it can differ only for window=None and ratio budgets).
        windows = [min(self.window_for(max(1, n)), obs.context.num_new) for n in obs.real_entries]
        votes_bgk = obs.attention_received(last_queries=windows[0])
        for window in set(windows) - {windows[0]}:
            rows = [row for row, w in enumerate(windows) if w == window]
            votes_bgk[rows] = obs.attention_received(last_queries=window)[rows]
        b, g, k = votes_bgk.shape
        pool = F.max_pool1d if self.pooling == "max" else F.avg_pool1d
        pooled = pool(votes_bgk.view(b * g, 1, k), kernel_size=self.kernel, stride=1, padding=self.kernel // 2)
        pooled = pooled.view(b, g, k)
        for row, window in enumerate(windows):  # the observation window itself: this forward's last tokens
            pooled[row, :, k - window :] = math.inf
        return pooled
