"""transformers' own cache classes x attention implementations x families: does each decode as the
uncached forward does? The original transformers model of every zoo family (no hooks of this library
inside), a correct greedy loop with the cache class, `verify_decode_loop` watching from outside
(`interp_cache.verify.cache_classes`). Writes `results/cache_matrix.md` and `.json`.

    python experiments/cache_matrix.py            # every zoo family, ~1 min on 2 cores
    python experiments/cache_matrix.py --quick --out /tmp/q
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

import interp_cache as ic
from interp_cache.models.zoo import ZOO
from interp_cache.verify.cache_classes import CACHE_CLASSES, verify_cache_class

RESULTS = Path(__file__).resolve().parent / "results"
ATTENTION = ("eager", "sdpa")
QUICK_FAMILIES = ("llama", "bloom")


def cell(row) -> str:
    if row.status == "pass":
        return f"pass {row.max_abs_err:.0e}"
    if row.status == "skip":
        return "n/a"
    if row.max_abs_err is None:
        return "**raises**"
    return ("lossy " if "lossy" in row.note else "**departs** ") + f"{row.max_abs_err:.0e}"


def run(families, new_tokens: int) -> list[dict]:
    rows = []
    for family in families:
        model = ic.load(f"zoo:{family}")
        for cache in CACHE_CLASSES:
            for attention in ATTENTION:
                row = verify_cache_class(model, cache, attention, max_new_tokens=new_tokens, name=family).rows[0]
                rows.append({"family": family, "cache": cache, "attention": attention, "status": row.status,
                             "cell": cell(row), "max_abs_err": row.max_abs_err, "note": row.note})
    return rows


def markdown(rows: list[dict], seconds: float) -> str:
    columns = [(cache, attention) for cache in CACHE_CLASSES for attention in ATTENTION]
    lines = [
        "# transformers' cache classes vs the uncached forward",
        "",
        f"`experiments/cache_matrix.py`, transformers {__import__('transformers').__version__}, torch "
        f"{torch.__version__}, float32, 3 prompts (one left-padded), 8 new tokens, {seconds:.0f} s. Cell: max |logit "
        "difference| of a correct greedy loop with that cache vs the model's uncached forward (`pass` within "
        "1e-4); `n/a`: transformers refuses the combination or it needs a GPU (notes below); `lossy`: a "
        "quantized cache, not exact by design; `raises` / `departs`: a finding about transformers.",
        "",
        "| family | " + " | ".join(f"{cache} {attention}" for cache, attention in columns) + " |",
        "|---|" + "---|" * len(columns),
    ]
    by_key = {(r["family"], r["cache"], r["attention"]): r for r in rows}
    for family in dict.fromkeys(r["family"] for r in rows):
        lines.append(f"| {family} | " + " | ".join(by_key[(family, c, a)]["cell"] for c, a in columns) + " |")
    lines += ["", "## Findings and reasons", ""]
    notes: dict[str, list[str]] = {}
    for r in rows:
        if r["status"] != "pass":
            notes.setdefault(r["note"], []).append(f"{r['family']} {r['cache']} {r['attention']}")
    for note, where in notes.items():
        lines.append(f"- {', '.join(where)}: {note}")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help=f"families {', '.join(QUICK_FAMILIES)} only")
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    started = time.perf_counter()
    rows = run(QUICK_FAMILIES if args.quick else list(ZOO), new_tokens=8)
    seconds = time.perf_counter() - started
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "cache_matrix.md").write_text(markdown(rows, seconds))
    (args.out / "cache_matrix.json").write_text(json.dumps(rows, indent=1) + "\n")
    failed = [r for r in rows if r["status"] in ("fail", "upstream") and not r["cell"].startswith("lossy")]
    print(f"{len(rows)} cells, {sum(r['status'] == 'pass' for r in rows)} pass, {len(failed)} findings "
          f"({seconds:.0f}s) -> {args.out / 'cache_matrix.md'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
