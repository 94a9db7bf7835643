"""The state of one forward pass: which decode step, which true positions.

The hooked model opens a context before the wrapped transformers model runs and closes it after; every
attention adapter, cache layer and hook call reads step and positions from it, so none of them derives
positions on its own (the bug class of seed 000).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import cached_property

import torch

PADDING_POSITION = -1  # the position a padding entry (or a hidden slot) is stored and read with


@dataclass
class ForwardContext:
    step: int
    positions: torch.Tensor  # [b, p] true absolute positions of this forward's tokens
    is_padding: torch.Tensor  # [b, p] True where the token is padding
    has_padding: bool  # is_padding.any(), computed once
    mask_memo: dict = field(default_factory=dict)  # attention masks shared by layers with equal key positions

    @cached_property
    def stored_positions(self) -> torch.Tensor:
        """`[b, p]` positions as the cache stores them: -1 for padding. Read after `hook_position_ids` ran."""
        return self.positions.masked_fill(self.is_padding, PADDING_POSITION) if self.has_padding else self.positions

    @property
    def num_new(self) -> int:
        return self.positions.shape[1]
