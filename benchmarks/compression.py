"""Compression benchmarks, measured in one run: Quest's decode-attention time vs dense, AdaKV's bytes vs full.

1. Quest. One attention layer shaped like Llama-2-7B's (32 heads, head_dim 128, float32), its cache holding
   8K and 16K tokens. A decode step's attention -- write the new entry, choose what to read, read it,
   attend -- is timed with no policy (dense) and with `Quest(budget=n/16, page_size=16)`. Each variant's
   fastest of `--repeats` alternating runs is used (interference on a shared machine only adds time).
   Target: Quest >= 4x faster than dense at both lengths.
2. AdaKV. The 4-layer d=256 llama-style zoo model prefills a 1024-token prompt with no policy and with
   `AdaKV(SnapKV(budget=B), alpha=0.2)`; `cache.nbytes` (every tensor the cache holds) is compared with the
   full cache, with the (B/L) target, and with what storing the same unequal heads padded to the longest
   head would cost. Target: bytes <= (B/L) * full + 5%.
"""

from __future__ import annotations

import argparse
import time

import torch

from interp_cache.cache import HookedCacheLayer
from interp_cache.compress import AdaKV, Quest, SnapKV
from interp_cache.core.attention import AttentionSpec, attend
from interp_cache.core.context import ForwardContext
from interp_cache.core.hook_points import AttentionHooks, CacheHooks
from interp_cache.decoding import Stepper
from interp_cache.models.hooked_model import HookedModel
from interp_cache.models.tokenizer import ByteTokenizer
from interp_cache.models.zoo import build_zoo_model

HEADS, HEAD_DIM = 32, 128


def decode_attention_seconds(num_tokens: int, policy, repeats: int) -> list[float]:
    """Times of `repeats` decode-step attentions over a cache of `num_tokens` entries."""
    torch.manual_seed(0)
    spec = AttentionSpec(num_heads=HEADS, num_kv_heads=HEADS, head_dim=HEAD_DIM, scaling=HEAD_DIM**-0.5)
    layer = HookedCacheLayer(0, 1, policy)
    cache_hooks, attn_hooks = CacheHooks(0, spec.head_dims), AttentionHooks(0, spec.head_dims, rotary=True, alibi=False)
    keys = torch.randn(1, HEADS, num_tokens, HEAD_DIM)
    prefill = ForwardContext(0, torch.arange(num_tokens)[None], torch.zeros(1, num_tokens, dtype=torch.bool), False)
    layer.write_and_read(keys, torch.randn_like(keys), prefill, cache_hooks, keys[:, :, :1], spec)
    times = []
    for step in range(repeats):
        context = ForwardContext(step + 1, torch.tensor([[num_tokens]]), torch.zeros(1, 1, dtype=torch.bool), False)
        query = torch.randn(1, HEADS, 1, HEAD_DIM)
        new_key = torch.randn(1, HEADS, 1, HEAD_DIM)
        start = time.perf_counter()
        read = layer.write_and_read(new_key, new_key, context, cache_hooks, query, spec)
        attend(query, read, spec, context, attn_hooks)
        times.append(time.perf_counter() - start)
        layer.truncate(num_tokens, num_tokens)  # the next repeat decodes from the same cache
    return times


def quest_benchmark(repeats: int) -> None:
    print(f"Quest decode attention, one {HEADS}-head x {HEAD_DIM} layer, float32, budget = tokens / 16, page 16")
    print(f"{'cached tokens':>14} {'dense ms':>10} {'quest ms':>10} {'speed-up':>9}")
    for num_tokens in (8192, 16384):
        quest = Quest(budget=num_tokens // 16, page_size=16, dense_layers=0)
        dense_times, quest_times = [], []
        for _ in range(3):  # alternate the variants so machine noise hits both alike
            dense_times += decode_attention_seconds(num_tokens, None, repeats)
            quest_times += decode_attention_seconds(num_tokens, quest, repeats)
        dense, selected = min(dense_times), min(quest_times)
        print(f"{num_tokens:>14} {dense * 1e3:>10.2f} {selected * 1e3:>10.2f} {dense / selected:>8.1f}x")


def adakv_benchmark(prompt_tokens: int, budgets: list[int]) -> None:
    model = HookedModel(build_zoo_model("llama", hidden=256, layers=4, heads=8), ByteTokenizer())
    torch.manual_seed(0)
    input_ids = torch.randint(0, 256, (1, prompt_tokens))
    full = Stepper(model)
    full.prefill(input_ids)
    full_bytes = full.cache.nbytes
    print(f"\nAdaKV cache bytes, 4-layer d=256 llama-style zoo model, {prompt_tokens}-token prompt")
    print(f"full cache: {full_bytes} bytes")
    print(f"{'budget':>7} {'bytes':>9} {'bytes/full':>10} {'B/L':>7} {'padded/full':>11} {'head counts min..max':>21}")
    for budget in budgets:
        stepper = Stepper(model, compress=AdaKV(SnapKV(budget=budget, window=8, kernel=7), alpha=0.2))
        stepper.prefill(input_ids)
        counts = stepper.cache.kept_counts()  # [layers, b, g]
        # What a uniform [b, g, longest head, d] layout of the same keep-sets would hold.
        padded_bytes = full_bytes * (counts.amax(dim=(1, 2)).sum().item() / (model.num_layers * prompt_tokens))
        ratio = stepper.cache.nbytes / full_bytes
        print(f"{budget:>7} {stepper.cache.nbytes:>9} {ratio:>10.4f} {budget / prompt_tokens:>7.4f} "
              f"{padded_bytes / full_bytes:>11.4f} {int(counts.min()):>10}..{int(counts.max())}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--prompt-tokens", type=int, default=1024)
    args = parser.parse_args()
    with torch.no_grad():
        quest_benchmark(args.repeats)
        adakv_benchmark(args.prompt_tokens, [64, 128, 256])


if __name__ == "__main__":
    main()
