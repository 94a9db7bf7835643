"""The passkey budget study: how much of the KV cache each compression policy needs to keep retrieving.

    python experiments/passkey_budget.py                  # both trained models, the default grid
    python experiments/passkey_budget.py --model needle   # one model
    python experiments/passkey_budget.py --quick --out /tmp/q   # a small grid (the tests run it)

For each trained model (`zoo:needle`, `zoo:needle-alibi`) and each policy x budget x prompt length, greedy
answers to passkey prompts (`interp_cache.tasks.passkey`) with the needle at depths 0, 25, 50, 75, 100%;
accuracy with a Wilson 95% interval and the cache bytes per sequence after the last step, relative to the
full cache. Writes, under `--out` (default `experiments/results/passkey_budget/`): `<model>.md` (tables),
`<model>.json` (every cell), `<model>_accuracy.png` (accuracy vs budget, a line per policy, a panel per
length) and `<model>_depths.png` (depth x length accuracy per policy at budget 64). A budget that covers
the prompt keeps every entry (the identity, bit for bit: `tests/test_compress.py`), so those cells are
the full-cache cell and are marked so rather than recomputed. Same `--seed`, same tables.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

import interp_cache as ic  # noqa: E402
import study_cli  # noqa: E402  (experiments/study_cli.py, beside this script)
from interp_cache.compress import H2O, AdaKV, KNorm, PyramidKV, Quest, Random, SnapKV, StreamingLLM  # noqa: E402
from interp_cache.tasks.passkey import PasskeyAnswers, PasskeyPrompt, passkey_prompts  # noqa: E402
from shared_prefill import answer_under_policies  # noqa: E402  (experiments/shared_prefill.py, beside this script)

RESULTS = Path(__file__).resolve().parent / "results" / "passkey_budget"


def _snap_window(budget: int) -> int:
    return min(32, budget // 2)


POLICIES: dict[str, Callable[[int], object] | None] = {
    "Full": None,
    "StreamingLLM": lambda b: StreamingLLM(sink=4, window=b - 4),
    "H2O": lambda b: H2O(heavy=b // 2, recent=b - b // 2),
    "SnapKV": lambda b: SnapKV(budget=b, window=_snap_window(b)),
    "PyramidKV": lambda b: PyramidKV(budget=b, window=_snap_window(b)),
    "AdaKV": lambda b: AdaKV(SnapKV(budget=b, window=_snap_window(b)), alpha=0.2),
    "Quest": lambda b: Quest(budget=b, page_size=8, dense_layers=1),
    "Random": lambda b: Random(budget=b, seed=0),
    "KNorm": lambda b: KNorm(budget=b),
}
POLICY_NOTES = {
    "StreamingLLM": "4 sinks + budget-4 newest",
    "H2O": "budget/2 heavy hitters + budget/2 recent",
    "SnapKV": "window min(32, budget/2), max-pool 7",
    "PyramidKV": "SnapKV's scores, beta 20",
    "AdaKV": "SnapKV base, alpha 0.2",
    "Quest": "page 8, layer 0 dense; reads budget, evicts nothing",
    "Random": "seed 0",
    "KNorm": "lowest key norms kept",
}


@dataclass(frozen=True)
class Grid:
    budgets: tuple[int, ...]
    lengths: dict[str, tuple[int, ...]]  # per model
    depths: tuple[float, ...]
    samples_per_depth: int
    extrapolation: dict[str, tuple[int, ...]]  # per model: full-cache lengths beyond the tables' (and training's)
    extrapolation_samples_per_depth: int


DEFAULT = Grid((16, 32, 64, 128, 256), {"needle": (256, 512, 1024), "needle-alibi": (256, 512, 1024, 2048)},
               (0.0, 0.25, 0.5, 0.75, 1.0), 20,
               {"needle": (1280, 1536, 2048, 3072), "needle-alibi": (2560, 3072, 4096)}, 10)
QUICK = Grid((32, 128), {"needle": (256, 512), "needle-alibi": (256, 512)}, (0.0, 0.5, 1.0), 4,
             {"needle": (1024,), "needle-alibi": (2048,)}, 2)
BATCH_TOKENS = 20 * 1024  # prompts per batch: at most this many tokens (4096-token ALiBi prompts: 5 a batch)


def wilson(hits: int, n: int, z: float = 1.96) -> tuple[float, float]:
    if n == 0:
        return (0.0, 1.0)
    p = hits / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return (max(0.0, centre - half), min(1.0, centre + half))


def cell_of(prompts: list[PasskeyPrompt], answers: PasskeyAnswers, depths) -> dict:
    by_depth = {}
    for depth in depths:
        chosen = [hit for prompt, hit in zip(prompts, answers.hits) if prompt.depth == depth]
        by_depth[str(depth)] = sum(chosen) / len(chosen)
    hits = sum(answers.hits)
    return {
        "hits": hits, "n": len(prompts), "accuracy": hits / len(prompts), "ci95": wilson(hits, len(prompts)),
        "by_depth": by_depth, "cache_bytes": sum(answers.cache_bytes) // len(prompts),
        "kept_entries": sum(answers.kept_entries) // len(prompts),
        "examples": answers.generated[:3],
    }


def study(model_name: str, grid: Grid, seed: int, log=print) -> dict:
    model = ic.load(f"zoo:{model_name}")
    cells = []
    started = time.perf_counter()
    for length in grid.lengths[model_name]:
        prompts = passkey_prompts(length, list(grid.depths), grid.samples_per_depth, seed=seed + length)
        policies = {("Full", None): None}
        policies |= {(name, budget): make(budget) for name, make in POLICIES.items() if make is not None
                     for budget in grid.budgets if budget < length}
        answers = answer_under_policies(model, prompts, policies, _batch_size(length, grid.samples_per_depth))
        full = cell_of(prompts, answers[("Full", None)], grid.depths)
        cells.append({"policy": "Full", "budget": None, "length": length, **full, "bytes_ratio": 1.0,
                      "entries_ratio": 1.0})
        for name, make in POLICIES.items():
            if make is None:
                continue
            for budget in grid.budgets:
                if budget >= length:
                    cell = {**full, "covers_prompt": True}
                else:
                    cell = cell_of(prompts, answers[(name, budget)], grid.depths)
                cell["bytes_ratio"] = cell["cache_bytes"] / full["cache_bytes"]
                cell["entries_ratio"] = cell["kept_entries"] / full["kept_entries"]
                cells.append({"policy": name, "budget": budget, "length": length, **cell})
        log(f"{model_name} {length} tokens: every policy done ({time.perf_counter() - started:.0f}s)")
    extrapolation = []
    for length in grid.extrapolation[model_name]:
        samples = grid.extrapolation_samples_per_depth
        prompts = passkey_prompts(length, list(grid.depths), samples, seed=seed + length)
        answers = answer_under_policies(model, prompts, {"Full": None}, _batch_size(length, samples))
        extrapolation.append({"length": length, **cell_of(prompts, answers["Full"], grid.depths)})
    log(f"{model_name}: extrapolation done ({time.perf_counter() - started:.0f}s)")
    return {"model": model_name, "seed": seed, "grid": grid.__dict__, "cells": cells,
            "extrapolation": extrapolation, "seconds": round(time.perf_counter() - started)}


def _batch_size(length: int, samples_per_depth: int) -> int:
    return max(1, min(samples_per_depth, BATCH_TOKENS // length))


# -- reporting ---------------------------------------------------------------------------------------
def _pct(value: float) -> str:
    return f"{100 * value:.0f}"


def _cell_text(cell: dict) -> str:
    lo, hi = cell["ci95"]
    mark = "=" if cell.get("covers_prompt") else ""
    return f"{mark}{_pct(cell['accuracy'])} [{_pct(lo)}-{_pct(hi)}]"


def markdown(result: dict) -> str:
    grid = result["grid"]
    cells = result["cells"]
    find = {(c["policy"], c["budget"], c["length"]): c for c in cells}
    training = ic.models.trained.training_record(result["model"])
    lines = [
        f"# Passkey retrieval under KV-cache compression: `zoo:{result['model']}`",
        "",
        f"Model: {training['description']}. Produced by `experiments/passkey_budget.py` (seed {result['seed']}, "
        f"{result['seconds']} s). Accuracy in % of greedy answers that start with the pass key, "
        f"[Wilson 95% interval]; {grid['samples_per_depth']} prompts at each depth "
        f"{', '.join(f'{100 * d:.0f}%' for d in grid['depths'])}. `=`: the budget covers the prompt, "
        "so the cache is the full one (the identity). Entries kept: KV entries stored after the last step "
        "(all layers and heads), per budget; bytes held: `cache.nbytes`, everything allocated, spare capacity "
        "and policy state included (Quest's page bounds and read buffer: it evicts nothing and holds more than the "
        "full cache). Each batch is prefilled once and compressed under every policy (`compress_prefilled`, the "
        "same caches as a prefill under each).",
        "",
    ]
    for length in grid["lengths"][result["model"]]:
        full = find[("Full", None, length)]
        lines += [f"## {length} tokens (full cache: {_cell_text(full)}, {full['cache_bytes']:,} bytes per sequence)",
                  "", "| policy | " + " | ".join(f"budget {b}" for b in grid["budgets"]) + " | entries kept / full | bytes held / full |",
                  "|---|" + "---|" * (len(grid["budgets"]) + 2)]
        for name in POLICIES:
            if name == "Full":
                continue
            row = [find[(name, b, length)] for b in grid["budgets"]]
            entries = " / ".join(f"{c['entries_ratio']:.2f}" for c in row)
            held = " / ".join(f"{c['bytes_ratio']:.2f}" for c in row)
            lines.append(f"| {name} ({POLICY_NOTES[name]}) | " + " | ".join(_cell_text(c) for c in row)
                         + f" | {entries} | {held} |")
        lines.append("")
    depths = grid["depths"]
    lines += ["## Full cache: accuracy by needle depth, and beyond the lengths in the tables", "",
              f"Trained on prompts up to {max(training['phases'][-1]['lengths'])} tokens. Lengths past that "
              f"are extrapolation ({grid['extrapolation_samples_per_depth']} prompts per depth there).", "",
              "| length | accuracy | " + " | ".join(f"depth {100 * d:.0f}%" for d in depths) + " |",
              "|---|---|" + "---|" * len(depths)]
    full_rows = [find[("Full", None, length)] for length in grid["lengths"][result["model"]]]
    lines += [f"| {c['length']} | {_cell_text(c)} | " + " | ".join(_pct(c["by_depth"][str(d)]) for d in depths) + " |"
              for c in full_rows + result["extrapolation"]]
    return "\n".join(lines) + "\n"


def plot_accuracy(result: dict, path: Path) -> None:
    grid = result["grid"]
    lengths = grid["lengths"][result["model"]]
    fig, axes = plt.subplots(1, len(lengths), figsize=(4.2 * len(lengths), 3.8), sharey=True, squeeze=False)
    for ax, length in zip(axes[0], lengths):
        full = next(c for c in result["cells"] if c["policy"] == "Full" and c["length"] == length)
        ax.axhline(100 * full["accuracy"], color="black", linestyle="--", linewidth=1, label="Full")
        for name in POLICIES:
            if name == "Full":
                continue
            row = sorted((c for c in result["cells"] if c["policy"] == name and c["length"] == length),
                         key=lambda c: c["budget"])
            ax.plot([c["budget"] for c in row], [100 * c["accuracy"] for c in row], marker="o", label=name)
        ax.set_xscale("log", base=2)
        ax.set_xticks(grid["budgets"], [str(b) for b in grid["budgets"]])
        ax.set_title(f"{length}-token prompts")
        ax.set_xlabel("budget (entries per head)")
        ax.set_ylim(-3, 103)
    axes[0][0].set_ylabel("pass keys retrieved (%)")
    axes[0][-1].legend(fontsize=7, loc="lower right")
    fig.suptitle(f"zoo:{result['model']}: passkey accuracy vs KV budget")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_depths(result: dict, path: Path, budget: int) -> None:
    grid = result["grid"]
    lengths = grid["lengths"][result["model"]]
    depths = grid["depths"]
    names = list(POLICIES)
    columns = 3
    rows = math.ceil(len(names) / columns)
    fig, axes = plt.subplots(rows, columns, figsize=(3.8 * columns, 3.2 * rows), squeeze=False,
                             constrained_layout=True)
    for ax, name in zip(axes.flat, names):
        wanted = None if name == "Full" else budget
        table = [[next(c for c in result["cells"] if c["policy"] == name and c["budget"] == wanted
                       and c["length"] == length)["by_depth"][str(d)] * 100 for length in lengths] for d in depths]
        image = ax.imshow(table, vmin=0, vmax=100, cmap="viridis", aspect="auto")
        for i, row in enumerate(table):
            for j, value in enumerate(row):
                ax.text(j, i, f"{value:.0f}", ha="center", va="center", fontsize=7,
                        color="white" if value < 60 else "black")
        ax.set_xticks(range(len(lengths)), [str(n) for n in lengths], fontsize=7)
        ax.set_yticks(range(len(depths)), [f"{100 * d:.0f}%" for d in depths], fontsize=7)
        ax.set_title(name if name == "Full" else f"{name} @ {budget}", fontsize=9)
        ax.set_xlabel("prompt tokens", fontsize=7)
        ax.set_ylabel("needle depth", fontsize=7)
    for ax in list(axes.flat)[len(names):]:
        ax.axis("off")
    fig.colorbar(image, ax=axes, label="pass keys retrieved (%)", shrink=0.6)
    fig.suptitle(f"zoo:{result['model']}: accuracy by needle depth and prompt length")
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write(result: dict, out: Path, heatmap_budget: int) -> None:
    out.mkdir(parents=True, exist_ok=True)
    name = result["model"]
    (out / f"{name}.json").write_text(json.dumps(result, indent=1) + "\n")
    (out / f"{name}.md").write_text(markdown(result))
    plot_accuracy(result, out / f"{name}_accuracy.png")
    plot_depths(result, out / f"{name}_depths.png", heatmap_budget)


def main(argv=None) -> int:
    parser = study_cli.parser(__doc__, RESULTS)
    parser.add_argument("--redraw", action="store_true",
                        help="rewrite the tables and figures from the saved <model>.json without running anything")
    args = study_cli.finish(parser.parse_args(argv))
    grid = QUICK if args.quick else DEFAULT
    if args.redraw:
        for name in args.model:
            result = json.loads((args.out / f"{name}.json").read_text())
            write(result, args.out, heatmap_budget=64 if 64 in result["grid"]["budgets"] else result["grid"]["budgets"][0])
        return 0
    for name in args.model:
        result = study(name, grid, args.seed)
        write(result, args.out, heatmap_budget=64 if 64 in grid.budgets else grid.budgets[0])
        print(markdown(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
