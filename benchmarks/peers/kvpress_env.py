"""kvpress in its own virtual environment (it pins transformers < 5.3), built by the benchmark itself:
torch first (the version this project runs, so pip does not fetch a different build), then kvpress. The
benchmark's weights are saved with `save_pretrained` and decoded there by `kvpress_decode.py`."""

from __future__ import annotations

import tempfile

import torch

from bench_model import SHAPE, SHAPE_TEXT, plain_model
from peers.environment import PeerEnvironment, PeerUnavailable
from interp_cache.models.zoo import build_zoo_model
from report import Section

KVPRESS_VERSION = "0.5.5"
ENVIRONMENT = PeerEnvironment(".kvpress-venv", [f"kvpress=={KVPRESS_VERSION}"])


def kvpress_comparison(prompt: int = 2048, new_tokens: int = 128, keep: int = 8, repeats: int = 5,
                       threads: int | None = None) -> tuple[dict[str, float], Section]:
    """kvpress's decode speed-ups (name -> ratio) and a section with its table, or a section saying why not."""
    threads = threads or torch.get_num_threads()
    section = Section(
        f"kvpress {KVPRESS_VERSION}: decode speed and bytes, {prompt}-token prompt, keep 1/{keep}",
        f"{SHAPE_TEXT}, the same weights through `save_pretrained`; kvpress's own environment ({ENVIRONMENT.venv.name}); "
        f"kvpress's pipeline recipe (prefill under the press, then single-token forwards), {new_tokens} steps, "
        f"{threads} threads, min / median / max ms per step over {repeats} alternating rounds; speed-up against "
        "no press in the same environment (eager presses against eager).",
        ["press", "ms per step", "speed-up", "bytes after prefill / full", "bytes at end / full"],
    )
    try:
        with tempfile.TemporaryDirectory() as weights, tempfile.TemporaryDirectory() as bloom:
            plain_model().save_pretrained(weights)
            build_zoo_model("bloom", **{k: v for k, v in SHAPE.items() if k != "num_key_value_heads"}).save_pretrained(bloom)
            result = ENVIRONMENT.run("kvpress_decode.py", weights, "--bloom", bloom, "--prompt", str(prompt),
                                     "--new", str(new_tokens), "--keep", str(keep), "--repeats", str(repeats),
                                     "--threads", str(threads))
    except PeerUnavailable as error:
        section.notes.append(f"kvpress could not run here: {error}")
        return {}, section
    section.settings += f" Versions there: transformers {result['transformers']}, torch {result['torch']}."
    full_prefill = result["rows"]["none"]["bytes_after_prefill"]
    for name, row in result["rows"].items():
        seconds = sorted(row["seconds"])
        spread = " / ".join(f"{s * 1e3 / new_tokens:.2f}" for s in (seconds[0], seconds[len(seconds) // 2], seconds[-1]))
        section.add(name, spread, f"{row['speed_up']:.2f}", f"{row['bytes_after_prefill'] / full_prefill:.3f}",
                    f"{row['bytes_at_end_over_full']:.3f}")
    section.notes += [
        "kvpress compresses at the prefill only (except DecodingPress): the cache grows again while decoding.",
        "AdaKVPress masks entries (fake keys searched at every step) and frees nothing.",
        f"kvpress on a Bloom (ALiBi) model of the same size, SnapKVPress: {result['bloom']}",
    ]
    ratios = {name: row["speed_up"] for name, row in result["rows"].items()}
    return ratios, section
