"""The command line every study on the trained models shares: which models, seed, threads, quick mode,
where results go. `parse(doc, results)` returns the arguments with torch's threads set and `--out` made."""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from interp_cache.models.trained import trained_models


def parser(doc: str, results: Path) -> argparse.ArgumentParser:
    made = argparse.ArgumentParser(description=doc.split("\n")[0])
    made.add_argument("--model", choices=list(trained_models()), action="append",
                      help="default: every shipped trained model")
    made.add_argument("--seed", type=int, default=0)
    made.add_argument("--threads", type=int, default=2)
    made.add_argument("--quick", action="store_true", help="a small grid in under 2 minutes (what the tests run)")
    made.add_argument("--out", type=Path, default=results)
    return made


def finish(args: argparse.Namespace) -> argparse.Namespace:
    """Set torch's threads, create `--out`, default `--model` to every shipped model."""
    torch.set_num_threads(args.threads)
    args.out.mkdir(parents=True, exist_ok=True)
    args.model = args.model or list(trained_models())
    return args
