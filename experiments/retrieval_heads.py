"""Interpretation-guided compression: find the heads that carry the pass key, give them the full cache and
every other head a short StreamingLLM window, and compare accuracy vs bytes with uniform policies.

    python experiments/retrieval_heads.py                  # both trained models
    python experiments/retrieval_heads.py --quick --out /tmp/q

1. Attention: record `hook_pattern` while each model answers; per head, the attention mass the query that
   predicts the first digit puts on the needle (the two mentions of the key).
2. Patching: `sweep` over layer x head of `attn.hook_z`, the clean run (key A) patched into a run with a
   different key B at the one decode step that predicts the first digit; metric: log-prob of A's first
   digit. Normalized effect 1 = that head alone restores the clean answer.
3. Compression: the KV heads of the top query heads by patching effect keep their whole cache
   (`HeadWise({(layer, kv_head): None, ...}, default=StreamingLLM(...))`); the same number of randomly
   chosen KV heads is the control. Uniform policies run at the budget with the same total entries.
Writes `<model>.md`, `<model>.json` and `<model>_heads.png` under `--out`.
"""

from __future__ import annotations

import json
import random
import time
from dataclasses import dataclass
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402

import interp_cache as ic  # noqa: E402
import study_cli  # noqa: E402  (experiments/study_cli.py, beside this script)
from interp_cache.analysis.sweep import sweep  # noqa: E402
from interp_cache.compress import AdaKV, HeadWise, SnapKV, StreamingLLM  # noqa: E402
from interp_cache.tasks.passkey import passkey_prompt, passkey_prompts  # noqa: E402
from shared_prefill import answer_under_policies  # noqa: E402  (experiments/shared_prefill.py, beside this script)

RESULTS = Path(__file__).resolve().parent / "results" / "retrieval_heads"
SINK = 4


@dataclass(frozen=True)
class Settings:
    probe_length: int
    probe_prompts: int
    eval_lengths: dict[str, tuple[int, ...]]
    eval_samples_per_depth: int
    windows: tuple[int, ...]  # StreamingLLM windows of the non-retrieval heads
    retrieval_kv_heads: dict[str, int]  # how many KV heads keep the full cache


DEPTHS = (0.0, 0.25, 0.5, 0.75, 1.0)
DEFAULT = Settings(512, 20, {"needle": (512, 1024), "needle-alibi": (1024, 2048)}, 20, (12, 28, 60),
                   {"needle": 2, "needle-alibi": 4})
QUICK = Settings(256, 4, {"needle": (512,), "needle-alibi": (512,)}, 2, (28,), {"needle": 2, "needle-alibi": 4})


def needle_mask(prompt, length: int) -> torch.Tensor:
    """`[length]` True on the tokens of the two mentions of the key inside the needle."""
    mask = torch.zeros(length, dtype=torch.bool)
    start = prompt.needle_start
    needle_text = prompt.text[start:]
    for mention in (needle_text.index(prompt.passkey), needle_text.index(prompt.passkey + " is the")):
        mask[start + mention : start + mention + len(prompt.passkey)] = True
    return mask


def attention_to_needle(model, prompts) -> torch.Tensor:
    """`[layers, heads]` mean attention of the first-digit query to the key's tokens."""
    ids = model.tokenizer([p.text + " " for p in prompts], return_tensors="pt")["input_ids"]
    names = [f"blocks.{i}.attn.hook_pattern" for i in range(model.num_layers)]
    with model.record(names) as rec:
        model(ids)
    masks = torch.stack([needle_mask(p, ids.shape[1]) for p in prompts])  # [b, k]
    rows = []
    for name in names:
        pattern_bhqk = rec[name][0].activation
        last_query_bhk = pattern_bhqk[:, :, -1]
        rows.append((last_query_bhk * masks[:, None, :]).sum(-1).mean(0))
    return torch.stack(rows)


def patching_effects(model, prompts, seed: int):
    """`sweep` of attn.hook_z over layer x head at the first-digit step; normalized effects `[layers, heads]`."""
    rng = random.Random(seed)
    clean_texts, corrupted_texts, digits = [], [], []
    for p in prompts:
        other = p.passkey
        while other[0] == p.passkey[0]:
            other = str(rng.randrange(10_000, 100_000))
        corrupted = passkey_prompt(len(p.text), p.depth, other)
        clean_texts.append(p.text + " ")
        corrupted_texts.append(corrupted.text + " ")
        digits.append(ord(p.passkey[0]))
    clean = model.tokenizer(clean_texts, return_tensors="pt")["input_ids"]
    corrupted = model.tokenizer(corrupted_texts, return_tensors="pt")["input_ids"]
    answer = torch.tensor(digits)

    def clean_digit_logprob(logits):
        last = logits[:, -1] if logits.ndim == 3 else logits
        return last.float().log_softmax(-1).gather(-1, answer[:, None]).mean()

    result = sweep(model, clean, corrupted, clean_digit_logprob, over="layer_head",
                   prefill=clean.shape[1] - 1, steps=[1], progress=False)
    return result


def kv_heads_of(model, layer: int, heads: list[int]) -> set[tuple[int, int]]:
    queries = model.blocks[layer].attn.hook_z.layout.size("head")
    kv = model.blocks[layer].cache.hook_k_write.layout.size("kv_head")
    return {(layer, head // (queries // kv)) for head in heads}


def top_kv_heads(model, effects: torch.Tensor, count: int) -> list[tuple[int, int]]:
    """The KV heads of the query heads with the largest patching effects, until `count` KV heads."""
    chosen: list[tuple[int, int]] = []
    for flat in effects.flatten().argsort(descending=True).tolist():
        layer, head = divmod(flat, effects.shape[1])
        for kv_head in sorted(kv_heads_of(model, layer, [head])):
            if kv_head not in chosen:
                chosen.append(kv_head)
        if len(chosen) >= count:
            return chosen[:count]
    return chosen


def evaluate(model, policies: dict, length: int, settings: Settings, seed: int) -> dict:
    """Per policy (None: the full cache), accuracy and the bytes and entries held, from one prefill per batch."""
    prompts = passkey_prompts(length, list(DEPTHS), settings.eval_samples_per_depth, seed=seed + length)
    answers = answer_under_policies(model, prompts, policies, batch_size=settings.eval_samples_per_depth)
    return {key: {"accuracy": sum(a.hits) / len(prompts), "n": len(prompts),
                  "cache_bytes": sum(a.cache_bytes) // len(prompts),
                  "kept_entries": sum(a.kept_entries) // len(prompts)} for key, a in answers.items()}


def run(model_name: str, settings: Settings, seed: int, log=print) -> dict:
    started = time.perf_counter()
    model = ic.load(f"zoo:{model_name}")
    probes = passkey_prompts(settings.probe_length, list(DEPTHS), settings.probe_prompts // len(DEPTHS) or 1, seed)
    attention = attention_to_needle(model, probes)
    patched = patching_effects(model, probes, seed)
    effects = patched.normalized()
    log(f"{model_name}: heads located ({time.perf_counter() - started:.0f}s)")
    count = settings.retrieval_kv_heads[model_name]
    retrieval = top_kv_heads(model, effects, count)
    all_kv = [(layer, g) for layer in range(model.num_layers)
              for g in range(model.blocks[layer].cache.hook_k_write.layout.size("kv_head"))]
    control = random.Random(seed).sample([h for h in all_kv if h not in retrieval], count)
    rows = []
    for length in settings.eval_lengths[model_name]:
        compared, policies = [], {"Full": None}
        for window in settings.windows:
            entries = count * length + (len(all_kv) - count) * (SINK + window)
            budget = max(SINK + 1, round(entries / len(all_kv)))  # uniform budget with the same total entries
            candidates = {
                "HeadWise (retrieval heads full)": HeadWise({h: None for h in retrieval},
                                                            default=StreamingLLM(SINK, window)),
                "HeadWise (random heads full)": HeadWise({h: None for h in control},
                                                         default=StreamingLLM(SINK, window)),
                "StreamingLLM (uniform)": StreamingLLM(SINK, budget - SINK),
                "SnapKV (uniform)": SnapKV(budget=budget, window=min(32, budget // 2)),
                "AdaKV (SnapKV base)": AdaKV(SnapKV(budget=budget, window=min(32, budget // 2))),
            }
            for name, policy in candidates.items():
                policies[(name, window)] = policy if budget < length else None
                compared.append((name, window, budget))
        cells = evaluate(model, policies, length, settings, seed)
        full = cells["Full"]
        rows.append({"length": length, "policy": "Full", **full})
        for name, window, budget in compared:
            cell = cells[(name, window)]
            rows.append({"length": length, "policy": name, "window": window, "budget": budget,
                         "bytes_ratio": cell["cache_bytes"] / full["cache_bytes"],
                         "entries_ratio": cell["kept_entries"] / full["kept_entries"], **cell})
        log(f"{model_name} {length}: compared ({time.perf_counter() - started:.0f}s)")
    return {"model": model_name, "seed": seed, "settings": settings.__dict__,
            "attention_to_needle": attention.tolist(), "patching_normalized": effects.tolist(),
            "patching_clean": patched.clean, "patching_corrupted": patched.corrupted,
            "retrieval_kv_heads": retrieval, "control_kv_heads": control, "rows": rows,
            "seconds": round(time.perf_counter() - started)}


def markdown(result: dict) -> str:
    attention = torch.tensor(result["attention_to_needle"])
    effects = torch.tensor(result["patching_normalized"])
    heads = attention.shape[1]
    lines = [f"# Retrieval heads of `zoo:{result['model']}` and head-wise compression", "",
             f"Produced by `experiments/retrieval_heads.py` (seed {result['seed']}, {result['seconds']} s).", "",
             "## Where the key is read", "",
             "Attention of the first-digit query to the key's tokens (mean over probes) / normalized patching "
             f"effect of `attn.hook_z` (clean log-prob {result['patching_clean']:.2f}, corrupted "
             f"{result['patching_corrupted']:.2f}).", "",
             "| layer | " + " | ".join(f"head {h}" for h in range(heads)) + " |", "|---|" + "---|" * heads]
    for layer in range(attention.shape[0]):
        lines.append(f"| {layer} | " + " | ".join(f"{attention[layer, h]:.2f} / {effects[layer, h]:+.2f}"
                                                  for h in range(heads)) + " |")
    lines += ["", f"Retrieval KV heads (full cache): {', '.join(map(str, map(tuple, result['retrieval_kv_heads'])))}; "
              f"random control: {', '.join(map(str, map(tuple, result['control_kv_heads'])))}.", "",
              "## Accuracy vs bytes", "",
              "Uniform policies run at the per-head budget that stores the same total entries as the head-wise "
              "policy next to them. Entries kept: KV entries stored after the last step, all layers and heads "
              "(the bytes of keys, values and positions are proportional to them); bytes held: `cache.nbytes`, "
              "spare capacity and policy state included.", "",
              "| length | StreamingLLM window of the other heads | policy | budget | accuracy | entries kept / full "
              "| bytes held / full |", "|---|---|---|---|---|---|---|"]
    for row in result["rows"]:
        if row["policy"] == "Full":
            lines.append(f"| {row['length']} | - | Full | - | {100 * row['accuracy']:.0f}% | 1.000 | 1.000 |")
        else:
            lines.append(f"| {row['length']} | {row['window']} | {row['policy']} | {row['budget']} | "
                         f"{100 * row['accuracy']:.0f}% | {row['entries_ratio']:.3f} | {row['bytes_ratio']:.3f} |")
    return "\n".join(lines) + "\n"


def plot(result: dict, path: Path) -> None:
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.2))
    for ax, key, title in ((axes[0], "attention_to_needle", "attention to the key"),
                           (axes[1], "patching_normalized", "patching effect of hook_z")):
        table = torch.tensor(result[key])
        image = ax.imshow(table.numpy(), cmap="viridis", aspect="auto")
        ax.set_xticks(range(table.shape[1]))
        ax.set_yticks(range(table.shape[0]))
        ax.set_xlabel("head")
        ax.set_ylabel("layer")
        ax.set_title(title)
        fig.colorbar(image, ax=ax)
    fig.suptitle(f"zoo:{result['model']}: which heads carry the pass key")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv=None) -> int:
    parser = study_cli.parser(__doc__, RESULTS)
    args = study_cli.finish(parser.parse_args(argv))
    for name in args.model:
        result = run(name, QUICK if args.quick else DEFAULT, args.seed)
        (args.out / f"{name}.json").write_text(json.dumps(result, indent=1) + "\n")
        (args.out / f"{name}.md").write_text(markdown(result))
        plot(result, args.out / f"{name}_heads.png")
        print(markdown(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
