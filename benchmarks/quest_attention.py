"""Quest's decode attention against dense attention over the same cache, one layer shaped like Llama-2-7B's.

32 heads, head_dim 128, float32, batch 1; the cache holds n random entries. One decode step's attention --
write the new entry, choose the pages (Quest), read, attend -- is timed with no policy (SDPA over every
entry) and with `Quest(budget=n/8 or n/16, page_size=16)`; each variant runs in turn, step after step, and
the cache is cut back to n entries after each step. The bound on the speed-up is 1 / (budget fraction +
the cost of scoring one page bound per 16 entries), about 8x at budget 1/16.
"""

from __future__ import annotations

import torch

from interp_cache.cache import HookedCacheLayer
from interp_cache.compress import Quest
from interp_cache.core.attention import AttentionSpec, attend
from interp_cache.core.context import ForwardContext
from interp_cache.core.hook_points import AttentionHooks, CacheHooks
from report import Section, target
from timing import alternate, seconds_of

HEADS, HEAD_DIM, PAGE = 32, 128, 16
TARGETS = {(16384, 16): 5.0, (32768, 16): 6.0}  # (cached tokens, budget divisor) -> speed-up the issue asks for


def _filled_layer(keys, values, policy) -> HookedCacheLayer:
    spec = AttentionSpec(num_heads=HEADS, num_kv_heads=HEADS, head_dim=HEAD_DIM, scaling=HEAD_DIM**-0.5)
    layer = HookedCacheLayer(0, 1, policy)
    n = keys.shape[2]
    prefill = ForwardContext(0, torch.arange(n)[None], torch.zeros(1, n, dtype=torch.bool), False)
    layer.write_and_read(keys, values, prefill, CacheHooks(0, spec.head_dims), keys[:, :, :1], spec)
    return layer


def _step(layer: HookedCacheLayer, n: int):
    spec = AttentionSpec(num_heads=HEADS, num_kv_heads=HEADS, head_dim=HEAD_DIM, scaling=HEAD_DIM**-0.5)
    cache_hooks = CacheHooks(0, spec.head_dims)
    attn_hooks = AttentionHooks(0, spec.head_dims, rotary=True, alibi=False)
    generator = torch.Generator().manual_seed(n)
    query = torch.randn(1, HEADS, 1, HEAD_DIM, generator=generator)
    new_key = torch.randn(1, HEADS, 1, HEAD_DIM, generator=generator)
    context = ForwardContext(1, torch.tensor([[n]]), torch.zeros(1, 1, dtype=torch.bool), False)

    def run():
        def attention():
            read = layer.write_and_read(new_key, new_key, context, cache_hooks, query, spec)
            attend(query, read, spec, context, attn_hooks)
        seconds = seconds_of(attention)
        layer.truncate(n, n)  # the next round decodes from the same cache
        return seconds
    return run


def quest_attention(lengths: list[int], divisors: list[int], repeats: int) -> Section:
    section = Section(
        "Quest decode attention vs dense",
        f"One attention layer: {HEADS} heads x head_dim {HEAD_DIM}, float32, batch 1, page {PAGE}; one decode "
        f"step's write + select + read + attend; min / median / max ms over {repeats} alternating steps.",
        ["cached tokens", "dense ms", "budget", "Quest ms", "speed-up"],
    )
    for n in lengths:
        generator = torch.Generator().manual_seed(0)
        keys = torch.randn(1, HEADS, n, HEAD_DIM, generator=generator)
        values = torch.randn(1, HEADS, n, HEAD_DIM, generator=generator)
        layers = {"dense": _filled_layer(keys, values, None)}
        for divisor in divisors:
            layers[f"1/{divisor}"] = _filled_layer(keys, values, Quest(budget=n // divisor, page_size=PAGE, dense_layers=0))
        del keys, values
        timings = alternate({name: _step(layer, n) for name, layer in layers.items()}, repeats, warmup=2)
        dense = timings.pop("dense")
        for budget, timing in timings.items():
            speed_up = dense.best / timing.best
            bound = TARGETS.get((n, int(budget.split("/")[1])))
            shown = f"{speed_up:.2f}" if bound is None else target(speed_up, bound)
            section.add(n, dense.spread(1e3, 2), budget, timing.spread(1e3, 2), shown)
        del layers
    return section
