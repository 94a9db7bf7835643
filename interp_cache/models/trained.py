"""The trained models shipped inside the package: small byte-level models whose attention retrieves.

Each lives in `interp_cache/trained/<name>/` as a transformers checkpoint (`config.json`,
`model.safetensors`) plus `training.json`, the record `experiments/train_needle.py` wrote when it trained
it (seed, steps, time, final loss, versions, a one-line description). The directory is the registry: a
model is shipped by adding its folder. They load through `from_pretrained`, exactly as a user's checkpoint.
"""

from __future__ import annotations

import json
from pathlib import Path

TRAINED_DIR = Path(__file__).resolve().parent.parent / "trained"


def trained_models() -> dict[str, Path]:
    """Name -> checkpoint folder of every shipped trained model, sorted by name."""
    if not TRAINED_DIR.is_dir():
        return {}
    folders = (path.parent for path in TRAINED_DIR.glob("*/config.json"))
    return {folder.name: folder for folder in sorted(folders)}


def training_record(name: str) -> dict:
    """What the training script recorded for the shipped model `name`."""
    models = trained_models()
    if name not in models:
        raise ValueError(f"no trained model {name!r}; shipped: {', '.join(models) or 'none'}")
    return json.loads((models[name] / "training.json").read_text())
