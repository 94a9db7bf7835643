"""Generation strategies on the trained models: cached vs uncached agreement, diversity and repetition, with
and without compression.

    python experiments/generation_strategies.py
    python experiments/generation_strategies.py --quick --out /tmp/q

Strategies are transformers' own (greedy, temperature, top-k, top-p, repetition penalty, beam search) run
through `model.generate`. Each is run with the KV cache and without it (`use_cache=False`: every step
recomputes the whole prefix), sampling from the same seed; the table gives the fraction of rows whose
tokens are identical. Distinct-n = unique n-grams / n-grams over all continuations; repetition = the
fraction of a continuation's 4-grams that already occurred earlier in the same text (prompt included).
Compressed runs use the cache only (compression has no uncached counterpart).
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import torch

import interp_cache as ic
import study_cli  # experiments/study_cli.py, beside this script
from interp_cache.compress import SnapKV, StreamingLLM
from interp_cache.tasks.passkey import passkey_prompts

RESULTS = Path(__file__).resolve().parent / "results" / "generation_strategies"
STRATEGIES = {
    "greedy": {"do_sample": False},
    "temperature 0.8": {"do_sample": True, "temperature": 0.8, "top_k": 0},
    "top-k 20": {"do_sample": True, "top_k": 20},
    "top-p 0.9": {"do_sample": True, "top_p": 0.9, "top_k": 0},
    "repetition penalty 1.3": {"do_sample": False, "repetition_penalty": 1.3},
    "beam search 4": {"do_sample": False, "num_beams": 4},
}
COMPRESSIONS = {"none": None, "StreamingLLM 4+60": StreamingLLM(sink=4, window=60),
                "SnapKV 64": SnapKV(budget=64, window=16)}


def distinct(continuations: list[list[int]], n: int) -> float:
    grams = [tuple(seq[i : i + n]) for seq in continuations for i in range(len(seq) - n + 1)]
    return len(set(grams)) / len(grams) if grams else 0.0


def repetition(prompt: list[int], continuation: list[int], n: int = 4) -> float:
    text = prompt + continuation
    seen = {tuple(text[i : i + n]) for i in range(len(prompt) - n + 1)}
    repeats = total = 0
    for i in range(len(prompt) - n + 1, len(text) - n + 1):
        gram = tuple(text[i : i + n])
        repeats += gram in seen
        total += 1
        seen.add(gram)
    return repeats / total if total else 0.0


def generate(model, ids, settings: dict, seed: int, new_tokens: int, **extra) -> torch.Tensor:
    torch.manual_seed(seed)
    out = model.generate(ids, max_new_tokens=new_tokens, min_new_tokens=new_tokens, **settings, **extra)
    return out[:, ids.shape[1] :]


def run(model_name: str, prompts: int, length: int, new_tokens: int, seed: int) -> dict:
    model = ic.load(f"zoo:{model_name}")
    texts = [p.text for p in passkey_prompts(length, [0.5], prompts, seed)]
    ids = model.tokenizer(texts, return_tensors="pt")["input_ids"]
    rows = []
    started = time.perf_counter()
    for strategy, settings in STRATEGIES.items():
        uncached = generate(model, ids, settings, seed, new_tokens, use_cache=False)
        for compression, policy in COMPRESSIONS.items():
            cached = generate(model, ids, settings, seed, new_tokens, compress=policy)
            continuations = cached.tolist()
            rows.append({
                "strategy": strategy, "compression": compression,
                "identical_to_uncached": (None if policy is not None
                                          else float((cached == uncached).all(-1).float().mean())),
                "distinct": {n: distinct(continuations, n) for n in (1, 2, 3)},
                "repetition": sum(repetition(p, c) for p, c in zip(ids.tolist(), continuations)) / len(continuations),
                "example": model.tokenizer.decode(cached[0]),
            })
    return {"model": model_name, "seed": seed, "prompts": prompts, "length": length, "new_tokens": new_tokens,
            "rows": rows, "seconds": round(time.perf_counter() - started)}


def markdown(result: dict) -> str:
    lines = [f"# Generation strategies on `zoo:{result['model']}`", "",
             f"Produced by `experiments/generation_strategies.py` (seed {result['seed']}, {result['seconds']} s): "
             f"{result['prompts']} passkey prompts of {result['length']} tokens, {result['new_tokens']} new tokens "
             "each. `identical`: fraction of rows whose cached tokens equal the uncached run's (same seed).", "",
             "| strategy | compression | identical cached vs uncached | distinct-1 | distinct-2 | distinct-3 | "
             "repetition (4-grams) | first continuation |", "|---|---|---|---|---|---|---|---|"]
    for row in result["rows"]:
        same = "-" if row["identical_to_uncached"] is None else f"{row['identical_to_uncached']:.2f}"
        d = row["distinct"]
        example = json.dumps(row["example"])[1:-1].replace("|", "\\|")
        lines.append(f"| {row['strategy']} | {row['compression']} | {same} | {d[1]:.2f} | {d[2]:.2f} | "
                     f"{d[3]:.2f} | {row['repetition']:.2f} | `{example}` |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    parser = study_cli.parser(__doc__, RESULTS)
    args = study_cli.finish(parser.parse_args(argv))
    for name in args.model:
        result = run(name, *((2, 256, 8) if args.quick else (16, 256, 48)), args.seed)
        (args.out / f"{name}.json").write_text(json.dumps(result, indent=1) + "\n")
        (args.out / f"{name}.md").write_text(markdown(result))
        print(markdown(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
