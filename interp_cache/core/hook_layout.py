"""What a hook point's activation looks like: its kind and the meaning and size of each axis.

Every hook point is created with its layout (`interp_cache.core.hook_points`), so recording, stitching,
patching selectors, localization and the memory bound read the layout off the point (or off a recording
that kept it) and never guess it from the hook's name.

Axis names: `batch`; `token` (this forward's new tokens); `head` (query heads) or `kv_head`; `channel`
(head dim); `model` (a residual / embedding width); `entry` (cache entries read); `choice` (what a
compression policy scores or keeps: entries or pages). A size is fixed where the point is created
(heads, widths) or None where it varies from call to call (batch, token, entry, choice).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from enum import Enum

import torch


class HookKind(str, Enum):
    TOKENS = "tokens"  # one slot per new token: [b, p, ...] or [b, g, p, d]
    KEYED = "keyed"  # [b, h, p, k]: a row per new token, a column per cache entry read
    ENTRIES = "entries"  # [b, g, k, ...]: one slot per cache entry read
    POLICY = "policy"  # a compression policy's scores / choice [b, g, n]: no token axis


VARYING_AXES = ("batch", "token", "entry", "choice")
_HEAD_AXES = ("head", "kv_head")


@dataclass(frozen=True)
class HookLayout:
    kind: HookKind
    axes: tuple[str, ...]
    sizes: tuple[int | None, ...]  # None on the varying axes
    dtype: torch.dtype | None = None  # a fixed element dtype (positions: int64; GPT-J scores: float32), else the model's
    mirrors: str | None = None  # "positions" / "key_positions": the activation is that call metadata itself
    infinities: bool = False  # +-inf are meaningful values here (scores: -inf hides an entry, +inf protects one)

    def __post_init__(self):
        if len(self.axes) != len(self.sizes):
            raise ValueError(f"a hook layout needs one size per axis; got axes {self.axes} and sizes {self.sizes}")
        for axis, size in zip(self.axes, self.sizes):
            if (size is None) != (axis in VARYING_AXES):
                raise ValueError(f"axis {axis!r} of layout {self.axes} must have a size iff it does not vary per call")

    @classmethod
    def of(cls, kind: HookKind, dtype: torch.dtype | None = None, mirrors: str | None = None,
           infinities: bool = False, **axes: int | None):
        """`HookLayout.of(HookKind.TOKENS, batch=None, token=None, head=4, channel=16)`: axes in order."""
        return cls(kind, tuple(axes), tuple(axes.values()), dtype, mirrors, infinities)

    def _axis(self, *names: str) -> int | None:
        for index, axis in enumerate(self.axes):
            if axis in names:
                return index
        return None

    def size(self, axis: str) -> int | None:
        """The declared size of axis `axis` (None where it varies per call)."""
        if axis not in self.axes:
            raise ValueError(f"layout {self.axes} has no axis {axis!r}")
        return self.sizes[self.axes.index(axis)]

    @property
    def token_axis(self) -> int | None:
        """The axis over this forward's new tokens (None for cache-entry and policy hooks)."""
        return self._axis("token")

    @property
    def head_axis(self) -> int | None:
        """The axis over query heads or KV heads (None where the activation has no head axis)."""
        return self._axis(*_HEAD_AXES)

    @property
    def holds_integers(self) -> bool:
        """The values are positions or indices (position ids, cache positions, keep-sets): facts, not floats."""
        return self.dtype is not None and not self.dtype.is_floating_point

    @property
    def fixed_elements(self) -> int:
        """Elements per (batch row x token x entry): the product of the fixed sizes."""
        return math.prod(size for size in self.sizes if size is not None)

    def to_json(self) -> dict:
        return {
            "kind": self.kind.value,
            "axes": list(self.axes),
            "sizes": list(self.sizes),
            "dtype": None if self.dtype is None else str(self.dtype).removeprefix("torch."),
            "mirrors": self.mirrors,
            "infinities": self.infinities,
        }

    @classmethod
    def from_json(cls, data: dict) -> HookLayout:
        """The inverse of `to_json`; raises ValueError on anything else."""
        try:
            dtype = None if data["dtype"] is None else getattr(torch, data["dtype"])
            if dtype is not None and not isinstance(dtype, torch.dtype):
                raise ValueError(f"unknown dtype {data['dtype']!r}")
            return cls(HookKind(data["kind"]), tuple(data["axes"]), tuple(data["sizes"]), dtype, data["mirrors"],
                       bool(data.get("infinities", False)))
        except (KeyError, TypeError, AttributeError) as error:
            raise ValueError(f"not a hook layout: {data!r} ({error})") from None
