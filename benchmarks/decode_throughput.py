"""Decode throughput of the hooked model (no hooks attached) vs the plain transformers model.

Same weights (a 4-layer, d=256 llama-style zoo variant), same prompt (256 tokens), 128 greedy new tokens.
Decode time is generate(128 new) minus generate(1 new), so the prefill is excluded. Runs alternate
between the two models, and each model's fastest repeat is used: on a shared machine, interference only
ever adds time, so the minimum is the least noisy estimate of what the code itself costs.
Prints tokens/s for each and the ratio hooked / plain (target >= 0.95).
"""

from __future__ import annotations

import argparse
import time

import torch

from interp_cache.models.hooked_model import HookedModel
from interp_cache.models.tokenizer import ByteTokenizer
from interp_cache.models.zoo import build_zoo_model

SHAPE = dict(hidden=256, layers=4, heads=8)


def timed_generate(generate, input_ids, new_tokens: int) -> float:
    start = time.perf_counter()
    with torch.no_grad():
        out = generate(input_ids, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False)
    elapsed = time.perf_counter() - start
    assert out.shape[1] == input_ids.shape[1] + new_tokens
    return elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prompt-tokens", type=int, default=256)
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=9)
    args = parser.parse_args()

    plain = build_zoo_model("llama", **SHAPE)
    hooked = HookedModel(build_zoo_model("llama", **SHAPE), tokenizer=ByteTokenizer())
    pad = hooked.tokenizer.pad_token_id
    input_ids = torch.randint(0, 256, (1, args.prompt_tokens), generator=torch.Generator().manual_seed(0))

    def plain_generate(ids, **kw):
        return plain.generate(ids, attention_mask=torch.ones_like(ids), pad_token_id=pad, **kw)

    runners = {"plain": plain_generate, "hooked": hooked.generate}
    for generate in runners.values():  # warm-up
        timed_generate(generate, input_ids, 4)
    full_seconds = {name: [] for name in runners}
    prefill_seconds = {name: [] for name in runners}
    for _ in range(args.repeats):
        for name, generate in runners.items():
            full_seconds[name].append(timed_generate(generate, input_ids, args.new_tokens))
            prefill_seconds[name].append(timed_generate(generate, input_ids, 1))
    throughput = {
        name: (args.new_tokens - 1) / (min(full_seconds[name]) - min(prefill_seconds[name])) for name in runners
    }
    print(f"model: llama-style zoo variant {SHAPE}, prompt {args.prompt_tokens}, new {args.new_tokens}, "
          f"threads {torch.get_num_threads()}, repeats {args.repeats}")
    for name, tps in throughput.items():
        print(f"{name:>7}: {tps:8.1f} decode tokens/s")
    print(f"ratio hooked/plain: {throughput['hooked'] / throughput['plain']:.3f}  (target >= 0.95)")


if __name__ == "__main__":
    main()
