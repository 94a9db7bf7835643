"""PyramidKV (Cai et al., 2024): SnapKV's scores with layer budgets falling linearly from bottom to top.

With average budget B, window w and k entries, following the authors' schedule: `min = (B - w) // beta`,
`max = 2 (B - w) - min` (capped at `k - w`, with `min` raised to keep the average), and layer `l` of `L`
keeps `max - l * ((max - min) // (L - 1)) + w` entries per head. Lower layers, whose attention is spread
out, keep more; upper layers, whose attention is concentrated, keep less.
"""

from __future__ import annotations

from dataclasses import dataclass

from interp_cache.compress.base import check_int
from interp_cache.compress.snapkv import SnapKV


@dataclass
class PyramidKV(SnapKV, name="pyramidkv"):
    beta: int = 20

    def __post_init__(self):
        super().__post_init__()
        check_int(self.beta, "PyramidKV beta", 1)

    def layer_budget(self, layer_idx, num_layers, num_entries):
        average = super().layer_budget(layer_idx, num_layers, num_entries)
        if average >= num_entries:
            return num_entries
        window = self.window_for(num_entries)
        chosen = average - window
        lowest = chosen // self.beta
        highest = 2 * chosen - lowest
        if highest >= num_entries - window:
            highest = num_entries - window
            lowest = 2 * chosen - highest
        step = (highest - lowest) // (num_layers - 1) if num_layers > 1 else 0
        return highest - layer_idx * step + window
