"""Recording hook activations across cached decoding: one entry per hook call, with step and positions.

`with model.record(names_filter) as rec: model.generate(...)` keeps, for every hook call, the activation
(detached, on `device`, optionally cast to `dtype`) with the decode step, the true positions and padding
of the forward's tokens and, for cache and attention hooks, the positions of the entries read. The
verifier's localization and user recordings are this one mechanism.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Callable, Iterator

import torch

# Which axis of each hook's activation runs over this forward's new tokens (None: over cache entries).
KEYED_HOOKS = ("hook_pos_bias", "hook_attn_scores", "hook_pattern")  # [b, h, p, k]: new tokens x entries read
_QUERY_AXIS_2 = KEYED_HOOKS + ("hook_k_write", "hook_v_write")
_ENTRY_HOOKS = ("hook_k_read", "hook_v_read", "hook_positions")
_POLICY_HOOKS = ("hook_scores", "hook_keep")


def is_policy_hook(name: str) -> bool:
    return name.rsplit(".", 1)[-1] in _POLICY_HOOKS


def position_axis(name: str) -> int | None:
    leaf = name.rsplit(".", 1)[-1]
    if leaf in _ENTRY_HOOKS or leaf in _POLICY_HOOKS:
        return None
    return 2 if leaf in _QUERY_AXIS_2 else 1


def head_axis(name: str) -> int | None:
    leaf = name.rsplit(".", 1)[-1]
    if leaf in ("hook_q", "hook_k", "hook_v", "hook_rot_q", "hook_rot_k", "hook_z"):
        return 2
    if leaf in _QUERY_AXIS_2 or leaf in _ENTRY_HOOKS:
        return 1
    return None


@dataclass
class RecordedCall:
    step: int
    positions: torch.Tensor  # [b, p] true positions of the forward's tokens
    is_padding: torch.Tensor  # [b, p]
    key_positions: torch.Tensor | None  # [b, g, k] positions of the entries read (cache/attention hooks)
    activation: torch.Tensor


class Recording:
    def __init__(self, names_filter=None, device: str | torch.device = "cpu", dtype: torch.dtype | None = None):
        self.names_filter = _as_filter(names_filter)
        self.device = device
        self.dtype = dtype
        self.calls: dict[str, list[RecordedCall]] = {}
        self.order: list[str] = []  # hook names in the order they first fired: model order

    def __getitem__(self, name: str) -> list[RecordedCall]:
        return self.calls[name]

    def __contains__(self, name: str) -> bool:
        return name in self.calls

    def names(self) -> list[str]:
        return list(self.order)

    def hook(self, activation: torch.Tensor, hook) -> None:
        value = activation.detach().to(self.device)
        if self.dtype is not None and value.is_floating_point():
            value = value.to(self.dtype)
        if hook.name not in self.calls:
            self.calls[hook.name] = []
            self.order.append(hook.name)
        key_positions = None if hook.key_positions is None else hook.key_positions.detach().to(self.device)
        self.calls[hook.name].append(RecordedCall(
            hook.step, hook.positions.detach().to(self.device), hook.is_padding.detach().to(self.device),
            key_positions, value,
        ))

    def stacked(self, name: str) -> torch.Tensor:
        """Prefill and decode steps of a per-token hook joined along its token axis: one full sequence."""
        axis = position_axis(name)
        if axis is None or name.rsplit(".", 1)[-1] in KEYED_HOOKS:
            raise ValueError(f"{name!r} has no single token axis to stack along (per-step key lengths differ)")
        return torch.cat([call.activation for call in self.calls[name]], dim=axis)


def _as_filter(names_filter) -> Callable[[str], bool]:
    if names_filter is None:
        return lambda name: True
    if isinstance(names_filter, str):
        return lambda name: name == names_filter
    if callable(names_filter):
        return names_filter
    names = set(names_filter)
    return lambda name: name in names


@contextlib.contextmanager
def record(model, names_filter=None, device="cpu", dtype=None) -> Iterator[Recording]:
    """Attach a recording hook to every matching hook point for the duration of the block."""
    recording = Recording(names_filter, device=device, dtype=dtype)
    with model.hooks(fwd_hooks=[(recording.names_filter, recording.hook)]):
        yield recording
