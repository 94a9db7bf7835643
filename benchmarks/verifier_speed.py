"""Verifier speed: the wall time of `interp-cache verify --all` (the README's `make verify`) and per model,
as the command itself reports each model's time."""

from __future__ import annotations

import re
import subprocess
import sys
import time

from report import Section

MODEL_LINE = re.compile(r"\[\d+/\d+\] zoo:(\S+) (\w+) \(([\d.]+)s\)")


def verifier_speed() -> Section:
    start = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", "interp_cache.cli", "verify", "--all"], capture_output=True, text=True)
    wall = time.perf_counter() - start
    per_model = MODEL_LINE.findall(done.stderr)
    section = Section(
        "Verifier speed: interp-cache verify --all",
        f"Every zoo model and shipped trained model, one process; wall time {wall:.1f} s including start-up "
        f"(exit code {done.returncode}).",
        ["model", "outcome", "seconds"],
    )
    for name, outcome, seconds in per_model:
        section.add(name, outcome, seconds)
    return section
