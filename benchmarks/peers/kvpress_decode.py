"""Run inside kvpress's own environment (transformers < 5.3): decode speed and cache bytes under kvpress's
presses, on weights saved by the main benchmark. Prints one JSON object.

    python kvpress_decode.py WEIGHTS_DIR --prompt 2048 --new 128 --repeats 5 --threads 2

The decode loop is kvpress's own pipeline recipe: prefill under `with press(model)` into a fresh
DynamicCache, then single-token forwards with explicit position ids; only the loop is timed. Byte ids only
(256..259 suppressed): the pad id's all-zero embedding makes AdaKVPress's fake-key search raise.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import time
import warnings

import torch
import transformers as tf

warnings.filterwarnings("ignore")
tf.utils.logging.set_verbosity_error()

import kvpress  # noqa: E402  (patches transformers' attention functions on import)
from kvpress import AdaKVPress, DecodingPress, KnormPress, ObservedAttentionPress, SnapKVPress, StreamingLLMPress  # noqa: E402

SPECIAL_IDS = [256, 257, 258, 259]


def presses(keep_fraction: float, budget: int) -> dict[str, tuple]:
    """name -> (press factory, attention implementation, the no-press run it is compared with)."""
    ratio = 1 - keep_fraction
    return {
        "none": (lambda: None, "sdpa", "none"),
        "SnapKV": (lambda: SnapKVPress(compression_ratio=ratio), "sdpa", "none"),
        "StreamingLLM": (lambda: StreamingLLMPress(compression_ratio=ratio), "sdpa", "none"),
        "AdaKV(SnapKV)": (lambda: AdaKVPress(SnapKVPress(compression_ratio=ratio)), "sdpa", "none"),
        "DecodingPress(Knorm, every 32)": (
            lambda: DecodingPress(base_press=KnormPress(), compression_interval=32, target_size=budget), "sdpa", "none"),
        "none (eager)": (lambda: None, "eager", "none (eager)"),
        "ObservedAttention (eager)": (lambda: ObservedAttentionPress(compression_ratio=ratio), "eager", "none (eager)"),
    }


def next_token(logits: torch.Tensor) -> torch.Tensor:
    logits = logits[:, -1:].clone()
    logits[..., SPECIAL_IDS] = float("-inf")
    return logits.argmax(-1)


def cache_bytes(cache) -> int:
    return sum(layer.keys.nbytes + layer.values.nbytes for layer in cache.layers)


@torch.no_grad()
def decode(model, ids, press, new_tokens: int):
    cache = tf.DynamicCache()
    decoding_press = isinstance(press, DecodingPress)
    with press(model) if press is not None and not decoding_press else contextlib.nullcontext():
        token = next_token(model(input_ids=ids, past_key_values=cache, logits_to_keep=1).logits)
    prefill_bytes = cache_bytes(cache)
    n = ids.shape[1]
    with press(model) if decoding_press else contextlib.nullcontext():
        start = time.perf_counter()
        for i in range(new_tokens):
            token = next_token(model(input_ids=token, past_key_values=cache, position_ids=torch.tensor([[n + i]])).logits)
        seconds = time.perf_counter() - start
    return seconds, prefill_bytes, cache_bytes(cache)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("weights")
    parser.add_argument("--bloom", help="weights of a Bloom (ALiBi) model of the same size, to try one press on")
    parser.add_argument("--prompt", type=int, default=2048)
    parser.add_argument("--new", type=int, default=128)
    parser.add_argument("--keep", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    ids = torch.randint(3, 251, (1, args.prompt), generator=torch.Generator().manual_seed(0))
    table = presses(1 / args.keep, args.prompt // args.keep)
    models = {impl: tf.AutoModelForCausalLM.from_pretrained(args.weights, dtype=torch.float32, attn_implementation=impl).eval()
              for impl in {impl for _, impl, _ in table.values()}}
    runs = {name: [] for name in table}
    for round_index in range(args.repeats + 1):  # round 0 warms up
        for name, (make, impl, _) in table.items():
            result = decode(models[impl], ids, make(), args.new)
            if round_index:
                runs[name].append(result)
    rows = {}
    for name, (_, _, baseline) in table.items():
        seconds = [r[0] for r in runs[name]]
        base = min(r[0] for r in runs[baseline])
        full_end = runs[baseline][0][2]
        rows[name] = dict(seconds=seconds, speed_up=base / min(seconds), bytes_after_prefill=runs[name][0][1],
                          bytes_at_end=runs[name][0][2], bytes_at_end_over_full=runs[name][0][2] / full_end)
    print(json.dumps(dict(kvpress=getattr(kvpress, "__version__", "?"), transformers=tf.__version__, torch=torch.__version__,
                          prompt=args.prompt, new_tokens=args.new, keep=args.keep, threads=args.threads, rows=rows,
                          bloom=try_bloom(args.bloom, ids[:, :256]) if args.bloom else None)))


def try_bloom(weights: str, ids: torch.Tensor) -> str:
    """'runs', or the error kvpress raises compressing a Bloom model (its own attention, eager only)."""
    try:
        model = tf.AutoModelForCausalLM.from_pretrained(weights, dtype=torch.float32, attn_implementation="eager").eval()
        with torch.no_grad(), SnapKVPress(compression_ratio=0.5)(model):
            model(input_ids=ids, past_key_values=tf.DynamicCache())
    except Exception as error:  # the peer's failure is the finding
        return f"{type(error).__name__}: {error}"
    return "runs"


if __name__ == "__main__":
    main()
