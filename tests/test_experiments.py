"""The experiments' quick modes, run as the README says, on the shipped trained models (`zoo:needle`,
`zoo:needle-alibi`): full-cache retrieval >= 95%, tables well formed, reruns identical, training deterministic."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import interp_cache as ic
from interp_cache.models.trained import trained_models, training_record
from interp_cache.tasks.passkey import answer_passkeys, passkey_prompts

EXPERIMENTS = Path(__file__).resolve().parent.parent / "experiments"


def experiment(name: str):
    if str(EXPERIMENTS) not in sys.path:  # the scripts import their shared study_cli from beside them
        sys.path.insert(0, str(EXPERIMENTS))
    spec = importlib.util.spec_from_file_location(name, EXPERIMENTS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def test_trained_models_are_shipped_small_and_load_by_zoo_name():
    assert "needle" in trained_models()
    for name, folder in trained_models().items():
        assert (folder / "model.safetensors").stat().st_size <= 5 * 2**20
        model = ic.load(f"zoo:{name}")
        assert model.family == {"needle": "llama", "needle-alibi": "bloom"}[name]
        record = training_record(name)
        assert record["train_seconds"] <= 30 * 60 and record["seed"] == 0
        assert set(record) >= {"description", "phases", "final_answer_nll", "torch", "transformers", "threads"}


@pytest.mark.parametrize("name", list(trained_models()))
def test_full_cache_retrieves_pass_keys_at_every_depth(name):
    model = ic.load(f"zoo:{name}")
    prompts = passkey_prompts(512, [0.0, 0.5, 1.0], 4, seed=7)
    answers = answer_passkeys(model, prompts, batch_size=4)
    assert sum(answers.hits) >= 0.95 * len(prompts), answers.generated


def test_passkey_budget_quick_mode(tmp_path):
    study = experiment("passkey_budget")
    study.main(["--quick", "--model", "needle", "--out", str(tmp_path), "--threads", "1"])
    result = json.loads((tmp_path / "needle.json").read_text())
    full = [c for c in result["cells"] if c["policy"] == "Full"]
    assert all(c["accuracy"] >= 0.95 for c in full), [c["accuracy"] for c in full]
    budgets, lengths = result["grid"]["budgets"], result["grid"]["lengths"]["needle"]
    assert len(result["cells"]) == len(lengths) * (1 + (len(study.POLICIES) - 1) * len(budgets))
    for cell in result["cells"]:
        lo, hi = cell["ci95"]
        assert 0 <= lo <= cell["accuracy"] <= hi <= 1 and cell["n"] == cell["hits"] + (cell["n"] - cell["hits"])
    table = (tmp_path / "needle.md").read_text()
    policy_rows = [line for line in table.splitlines() if line.startswith("| ") and " (" in line.split("|")[1]]
    assert len(policy_rows) == len(lengths) * (len(study.POLICIES) - 1)
    assert all(len(row.strip("|").split("|")) == 1 + len(budgets) + 2 for row in policy_rows)
    assert (tmp_path / "needle_accuracy.png").stat().st_size > 0 and (tmp_path / "needle_depths.png").exists()
    again = tmp_path / "again"
    study.main(["--quick", "--model", "needle", "--out", str(again), "--threads", "1"])
    first, second = (json.loads(p.read_text()) for p in (tmp_path / "needle.json", again / "needle.json"))
    assert [c["hits"] for c in first["cells"]] == [c["hits"] for c in second["cells"]]


def test_retrieval_heads_quick_mode(tmp_path):
    heads = experiment("retrieval_heads")
    heads.main(["--quick", "--model", "needle", "--out", str(tmp_path), "--threads", "1"])
    result = json.loads((tmp_path / "needle.json").read_text())
    effects = torch.tensor(result["patching_normalized"])
    assert effects.shape == (4, 8) and result["patching_clean"] > result["patching_corrupted"]
    assert len(result["retrieval_kv_heads"]) == 2
    full = next(r for r in result["rows"] if r["policy"] == "Full")
    assert full["accuracy"] >= 0.95


def test_generation_strategies_quick_mode_cached_equals_uncached(tmp_path):
    strategies = experiment("generation_strategies")
    strategies.main(["--quick", "--model", "needle", "--out", str(tmp_path), "--threads", "1"])
    result = json.loads((tmp_path / "needle.json").read_text())
    uncompressed = [r for r in result["rows"] if r["compression"] == "none"]
    assert len(uncompressed) == len(strategies.STRATEGIES)
    assert all(r["identical_to_uncached"] == 1.0 for r in uncompressed)


def test_training_is_deterministic_from_its_seed(tmp_path):
    train = experiment("train_needle")
    torch.set_num_threads(1)
    recipe = train.recipes()["needle"]
    for run in ("a", "b"):
        train.train("needle", recipe, seed=3, out_dir=tmp_path / run, scale_steps=0.002, log=lambda *_: None)
    first, second = (load_file(tmp_path / run / "model.safetensors") for run in ("a", "b"))
    assert first.keys() == second.keys()
    assert all(torch.equal(first[k], second[k]) for k in first)
