"""Timing in one process: variants alternate, repeat after a warm-up, and report min / median / max.

On a shared machine interference only ever adds time, so ratios are taken between minima; the median and
maximum show how noisy the run was.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass


@dataclass(frozen=True)
class Timing:
    seconds: list[float]

    @property
    def best(self) -> float:
        return min(self.seconds)

    @property
    def median(self) -> float:
        return statistics.median(self.seconds)

    @property
    def worst(self) -> float:
        return max(self.seconds)

    def spread(self, scale: float = 1.0, digits: int = 1) -> str:
        """`min / median / max`, each times `scale`."""
        return " / ".join(f"{value * scale:.{digits}f}" for value in (self.best, self.median, self.worst))


def seconds_of(run: Callable[[], object]) -> float:
    start = time.perf_counter()
    run()
    return time.perf_counter() - start


def alternate(variants: dict[str, Callable[[], float | None]], repeats: int, warmup: int = 1) -> dict[str, Timing]:
    """Run every variant `warmup` times, then `repeats` rounds of each in turn. A variant returns the seconds
    it measured itself (e.g. a decode loop that excludes its prefill) or None to be timed whole."""
    for _ in range(warmup):
        for run in variants.values():
            run()
    measured: dict[str, list[float]] = {name: [] for name in variants}
    for _ in range(repeats):
        for name, run in variants.items():
            start = time.perf_counter()
            own = run()
            measured[name].append(own if own is not None else time.perf_counter() - start)
    return {name: Timing(values) for name, values in measured.items()}
