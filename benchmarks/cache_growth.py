"""Cache growth: appending single-token decode steps to one cache layer, interp_cache's storage against
transformers' `DynamicCache`, which concatenates the whole layer on every step.

Per step [1, 2 KV heads, 1, 32] float32: a layer of the benchmark model. Bytes copied count every entry moved by a
resize (interp_cache: capacity grows by 1/32, so each entry moves about 32 times over 4096 steps at most) or a concatenation
(DynamicCache: every entry, every step), keys and values (and interp_cache's int64 positions).
"""

from __future__ import annotations

import torch
from transformers import DynamicCache

from interp_cache.cache.storage import LayerStorage
from report import Section
from timing import alternate

HEADS, HEAD_DIM = 2, 32  # the benchmark model's KV heads and head_dim


def _entry_bytes(with_positions: bool) -> int:
    return HEADS * (2 * HEAD_DIM * 4 + (8 if with_positions else 0))


def cache_growth(steps: int, repeats: int) -> Section:
    key = torch.randn(1, HEADS, 1, HEAD_DIM, generator=torch.Generator().manual_seed(0))
    positions = [torch.full((1, HEADS, 1), i, dtype=torch.long) for i in range(steps)]
    copied = {"interp_cache": 0, "DynamicCache": 0}

    def ours():
        storage, moved = LayerStorage(), 0
        for i in range(steps):
            capacity = storage.capacity
            storage.append(key, key, positions[i])
            if storage.capacity != capacity:
                moved += i  # a resize copies every entry already stored
        copied["interp_cache"] = moved * _entry_bytes(True)

    def dynamic():
        cache = DynamicCache()
        for _ in range(steps):
            cache.update(key, key, 0)
        copied["DynamicCache"] = sum(range(1, steps)) * _entry_bytes(False)  # cat copies the old entries each step

    timings = alternate({"interp_cache": ours, "DynamicCache": dynamic}, repeats)
    section = Section(
        f"Cache growth: {steps} single-token appends to one layer",
        f"[1, {HEADS}, 1, {HEAD_DIM}] float32 per step; min / median / max ms over {repeats} alternating rounds; "
        "bytes copied = entries moved by resizes / concatenations.",
        ["cache", "ms", "us per append", "MB copied", "speed-up vs DynamicCache"],
    )
    base = timings["DynamicCache"].best
    for name, timing in timings.items():
        section.add(name, timing.spread(1e3, 1), f"{timing.best / steps * 1e6:.1f}", f"{copied[name] / 1e6:.1f}",
                    f"{base / timing.best:.1f}")
    return section
