"""`make bench`: speed and memory against the peers, measured in one run, written to benchmarks/results.md.

Every figure comes from this run: min / median / max over alternating repeats after a warm-up, ratios taken
between minima in the same process (kvpress and nnsight each in its own environment, on the same saved
weights, against plain transformers in that process). A target
that is missed is marked MISSED in the table. `QUICK=1` (or `--quick`) runs a small grid in under 3 minutes:
fewer settings, repeats and steps, and no verifier, kvpress or nnsight run; its results go to results-quick.md.
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import time
from importlib.metadata import version
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from cache_growth import cache_growth  # noqa: E402
from eviction import h2o_prefill, memory, speed  # noqa: E402
from peers.kvpress_env import kvpress_comparison  # noqa: E402
from peers.nnsight_env import nnsight_recording  # noqa: E402
from quest_attention import quest_attention  # noqa: E402
from recording_overhead import generate_overhead, prefill_overhead  # noqa: E402
from scaling import scaling  # noqa: E402
from verifier_speed import verifier_speed  # noqa: E402

FULL = dict(
    generate_settings=[(256, 1), (256, 8), (2048, 1), (2048, 8)], new_tokens=128, repeats=5,
    decode_repeats=10,  # eviction decode rounds: 30 s for 5, and their minima moved by 0.1 between runs
    memory_prompts=[512, 2048, 8192], keeps=[4, 8, 16], memory_steps=16,
    quest_lengths=[4096, 8192, 16384, 32768], growth_steps=4096,
    scaling_lengths=[1024, 2048, 4096, 8192, 16384, 32768], scaling_steps=9,
)
QUICK = dict(
    generate_settings=[(256, 1)], new_tokens=32, repeats=3, decode_repeats=3,
    memory_prompts=[512], keeps=[8], memory_steps=4,
    quest_lengths=[4096, 16384], growth_steps=1024,
    scaling_lengths=[1024, 2048, 4096], scaling_steps=5,
)


def versions() -> str:
    installed = ", ".join(f"{name} {version(name)}" for name in ("transformers", "transformer-lens", "accelerate"))
    return f"python {platform.python_version()}, torch {torch.__version__}, {installed}"


def machine() -> str:
    return f"{platform.machine()}, {os.cpu_count()} CPU cores, {torch.get_num_threads()} torch threads, no GPU used"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", default=os.environ.get("QUICK") == "1")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    grid = QUICK if args.quick else FULL
    out = args.out or HERE / ("results-quick.md" if args.quick else "results.md")
    started = time.perf_counter()
    # The peers' own processes run first, while this one is small: recording 2048 x 8 here leaves gigabytes
    # in the allocator's heap, and nnsight recording the same beside it ran a 24 GiB machine out of memory.
    kvpress_ratios, kvpress_section = ({}, None) if args.quick else kvpress_comparison()
    nnsight_section = None if args.quick else nnsight_recording(
        grid["generate_settings"], grid["new_tokens"], grid["repeats"])
    runs = [
        lambda: generate_overhead(grid["generate_settings"], grid["new_tokens"], grid["repeats"]),
        lambda: nnsight_section,
        lambda: prefill_overhead(2048, grid["repeats"]),
        lambda: memory(grid["memory_prompts"], grid["keeps"], grid["memory_steps"]),
        lambda: speed(2048, 8, grid["new_tokens"], grid["decode_repeats"], kvpress_ratios),
        lambda: kvpress_section,
        lambda: h2o_prefill(2048, 8, grid["repeats"]),
        lambda: quest_attention(grid["quest_lengths"], [8, 16], grid["repeats"] * 4),
        lambda: cache_growth(grid["growth_steps"], grid["repeats"]),
        lambda: scaling(grid["scaling_lengths"], grid["scaling_steps"], out.with_name(out.stem + "-scaling.png")),
        lambda: None if args.quick else verifier_speed(),
    ]
    sections = []
    for run in runs:
        began = time.perf_counter()
        section = run()
        if section is not None:
            sections.append(section)
            print(f"{section.title}: {time.perf_counter() - began:.0f} s", file=sys.stderr, flush=True)
    header = [
        "# Benchmarks: speed and memory against the peers",
        "",
        f"Written by `{'QUICK=1 ' if args.quick else ''}make bench` (`benchmarks/run.py`) in {time.perf_counter() - started:.0f} s. "
        f"Machine: {machine()}. Versions: {versions()}.",
        "",
    ]
    text = "\n".join(header) + "\n".join(section.markdown() for section in sections)
    out.write_text(text)
    print(text)


if __name__ == "__main__":
    main()
