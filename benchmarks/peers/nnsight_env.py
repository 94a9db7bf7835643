"""nnsight in its own virtual environment, built by the benchmark itself (torch first, the version this
project runs, then nnsight), fed the benchmark's weights through `save_pretrained`; `nnsight_generate.py`
times it there against plain transformers `generate` in the same process."""

from __future__ import annotations

import tempfile
from pathlib import Path

import torch

from bench_model import SHAPE_TEXT, plain_model
from peers.environment import PeerEnvironment, PeerUnavailable
from report import Section
from timing import Timing

NNSIGHT_VERSION = "0.8.1"
ENVIRONMENT = PeerEnvironment(".nnsight-venv", [f"nnsight=={NNSIGHT_VERSION}",
                                                f"transformers=={__import__('transformers').__version__}"])
TOKENIZER_FILE = Path(__file__).resolve().parents[2] / "interp_cache" / "models" / "tokenizer.py"


def nnsight_recording(settings: list[tuple[int, int]], new_tokens: int, repeats: int,
                      threads: int | None = None) -> Section:
    """nnsight recording the 24 attention activations during generate, as a ratio to plain transformers
    `generate` in nnsight's own process; or a section saying why it could not run."""
    threads = threads or torch.get_num_threads()
    section = Section(
        f"nnsight {NNSIGHT_VERSION}: recording during greedy generate",
        f"{SHAPE_TEXT}, the same weights through `save_pretrained`; nnsight's own environment ({ENVIRONMENT.venv.name}); "
        f"{new_tokens} new tokens; min / median / max seconds over {repeats} alternating rounds after a warm-up, "
        f"{threads} threads; ratio = plain transformers generate (SDPA) in the same process / this (min). "
        "'attention 24' saves q, k, v, scores, pattern and z of every layer at every step, as interp_cache's "
        "'attention 24' records them (nnsight needs eager attention for the pattern and `.source` for the scores).",
        ["prompt x batch", "variant", "seconds", "ratio to plain", "saved values"],
    )
    try:
        with tempfile.TemporaryDirectory() as weights:
            plain_model().save_pretrained(weights)
            result = ENVIRONMENT.run(
                "nnsight_generate.py", weights, "--tokenizer-file", str(TOKENIZER_FILE),
                "--settings", ",".join(f"{tokens}x{batch}" for tokens, batch in settings),
                "--new", str(new_tokens), "--repeats", str(repeats), "--threads", str(threads))
    except PeerUnavailable as error:
        section.notes.append(f"nnsight could not run here: {error}")
        return section
    section.settings += f" Versions there: transformers {result['transformers']}, torch {result['torch']}."
    for row in result["settings"]:
        timings = {name: Timing(seconds) for name, seconds in row["seconds"].items()}
        base = timings["transformers generate"].best
        for name, timing in timings.items():
            saved = row["calls"] if name == "nnsight attention 24" else ""
            section.add(f"{row['prompt']} x {row['batch']}", name, timing.spread(digits=3),
                        f"{base / timing.best:.2f}", saved)
    return section
