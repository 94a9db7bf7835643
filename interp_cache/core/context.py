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
    on_devices: dict = field(default_factory=dict)  # this context's copy on each other device (`on`)

    @cached_property
    def stored_positions(self) -> torch.Tensor:
        """`[b, p]` positions as the cache stores them: -1 for padding. Read after `hook_position_ids` ran."""
        return self.positions.masked_fill(self.is_padding, PADDING_POSITION) if self.has_padding else self.positions

    @property
    def num_new(self) -> int:
        return self.positions.shape[1]

    def on(self, device: torch.device) -> ForwardContext:
        """This context with its tensors on `device`: a layer of a model split across devices reads positions
        where its cache entries live. Made once per device and forward."""
        if self.positions.device == device:
            return self
        moved = self.on_devices.get(device)
        if moved is None:
            moved = ForwardContext(self.step, self.positions.to(device), self.is_padding.to(device), self.has_padding)
            self.on_devices[device] = moved
        return moved
