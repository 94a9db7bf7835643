"""The experiments' quick modes, run as the README says, on the shipped trained models (`zoo:needle`,
`zoo:needle-alibi`): full-cache retrieval >= 95%, tables well formed, reruns identical, training deterministic."""

from __future__ import annotations

import importlib.util
import json
import sys
from dataclasses import replace
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


@pytest.mark.parametrize("name", list(trained_models()))
def test_one_prefill_for_every_policy_answers_as_generate_under_each_policy(name):
    """The budget study prefills each batch once and compresses it under every policy (`compress_prefilled`);
    its answers, bytes and kept entries equal `generate` run under each policy on its own."""
    study = experiment("passkey_budget")
    model = ic.load(f"zoo:{name}")
    prompts = passkey_prompts(300, [0.0, 1.0], 2, seed=5)
    policies = {(policy, 32): make(32) for policy, make in study.POLICIES.items() if make is not None}
    shared = experiment("shared_prefill").answer_under_policies(
        model, prompts, {("Full", None): None, **policies}, batch_size=2)
    for key, policy in [(("Full", None), None), *policies.items()]:
        alone = answer_passkeys(model, prompts, compress=policy, batch_size=2)
        assert shared[key] == alone, key


@pytest.fixture(scope="module")
def quick_budget_study(tmp_path_factory):
    """The quick study run twice on zoo:needle, as the README's command runs it."""
    study = experiment("passkey_budget")
    runs = []
    for name in ("first", "again"):
        out = tmp_path_factory.mktemp(name)
        study.main(["--quick", "--model", "needle", "--out", str(out), "--threads", "1"])
        runs.append(out)
    return study, runs


def test_passkey_budget_quick_mode_tables_are_well_formed_and_reproduced(quick_budget_study):
    study, (first, again) = quick_budget_study
    result = json.loads((first / "needle.json").read_text())
    budgets, lengths = result["grid"]["budgets"], result["grid"]["lengths"]["needle"]
    assert len(result["cells"]) == len(lengths) * (1 + (len(study.POLICIES) - 1) * len(budgets))
    for cell in result["cells"]:
        lo, hi = cell["ci95"]
        assert 0 <= lo <= cell["accuracy"] <= hi <= 1 and cell["n"] == cell["hits"] + (cell["n"] - cell["hits"])
    table = (first / "needle.md").read_text()
    policy_rows = [line for line in table.splitlines() if line.startswith("| ") and " (" in line.split("|")[1]]
    assert len(policy_rows) == len(lengths) * (len(study.POLICIES) - 1)
    assert all(len(row.strip("|").split("|")) == 1 + len(budgets) + 2 for row in policy_rows)
    assert (first / "needle_accuracy.png").stat().st_size > 0 and (first / "needle_depths.png").exists()
    second = json.loads((again / "needle.json").read_text())
    assert [c["hits"] for c in result["cells"]] == [c["hits"] for c in second["cells"]]
    full_512 = next(c for c in result["cells"] if c["policy"] == "Full" and c["length"] == 512)
    assert full_512["accuracy"] >= 0.95


def test_passkey_budget_quick_mode_full_cache_meets_the_bar(quick_budget_study):
    _, (first, _) = quick_budget_study
    result = json.loads((first / "needle.json").read_text())
    full = [c for c in result["cells"] if c["policy"] == "Full"]
    assert all(c["accuracy"] >= 0.95 for c in full), [c["accuracy"] for c in full]


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


def test_resumed_training_equals_training_from_scratch(tmp_path):
    """`--resume` (how the shipped models got their last phase) redraws the data of the phases the
    checkpoint ran and starts the last phase's fresh optimizer: the same weights as one run from scratch."""
    train = experiment("train_needle")
    torch.set_num_threads(1)
    recipe = train.recipes()["needle"]
    first_fresh = next(i for i, phase in enumerate(recipe.phases) if phase.fresh_optimizer)
    assert first_fresh > 0
    quiet = dict(seed=3, scale_steps=0.002, log=lambda *_: None)
    train.train("needle", recipe, out_dir=tmp_path / "scratch", **quiet)
    train.train("needle", replace(recipe, phases=recipe.phases[:first_fresh]), out_dir=tmp_path / "resumed", **quiet)
    record = train.train("needle", recipe, out_dir=tmp_path / "resumed", resume=tmp_path / "resumed", **quiet)
    assert len(record["phases"]) == len(recipe.phases)
    scratch, resumed = (load_file(tmp_path / run / "model.safetensors") for run in ("scratch", "resumed"))
    assert all(torch.equal(scratch[k], resumed[k]) for k in scratch)
    with pytest.raises(ValueError, match="fresh optimizer"):
        train.train("needle", recipe, out_dir=tmp_path / "again", resume=tmp_path / "resumed", **quiet)


def test_cache_matrix_quick_mode_finds_transformers_static_cache_under_alibi(tmp_path):
    matrix = experiment("cache_matrix")
    matrix.main(["--quick", "--out", str(tmp_path)])
    rows = json.loads((tmp_path / "cache_matrix.json").read_text())
    assert len(rows) == len(matrix.QUICK_FAMILIES) * len(matrix.CACHE_CLASSES) * len(matrix.ATTENTION)
    cells = {(r["family"], r["cache"], r["attention"]): r for r in rows}
    for cache in ("dynamic", "static"):
        llama = cells[("llama", cache, "sdpa")]
        assert llama["status"] == "pass" and llama["max_abs_err"] < 1e-4
    # transformers 5.23 (pinned): Bloom's ALiBi is built for the mask's length, StaticCache returns max_cache_len keys
    assert cells[("bloom", "static", "eager")]["cell"] == "**raises**"
    assert cells[("bloom", "quantized", "eager")]["cell"].startswith("lossy")
    table = (tmp_path / "cache_matrix.md").read_text()
    assert table.count("\n| llama |") == 1 and table.count("\n| bloom |") == 1


def test_seed000_plain_loop_repeats_and_is_localized_while_interp_cache_answers(tmp_path):
    seed = experiment("seed000_quest_loop")
    result = seed.run(tmp_path)
    assert not result["plain_text"].strip().startswith(result["passkey"])
    assert result["hooked_text"].strip().startswith(result["passkey"])
    found = result["plain_report"].rows[0].first_divergence
    assert (found.step, found.layer, found.position) == (1, 0, 512)
    assert found.loop_inputs["position_ids"] == [32] and found.loop_inputs["expected_position_ids"] == [512]
    assert result["hooked_report"].passed
    assert (tmp_path / "seed000_quest_loop.png").stat().st_size > 0


@pytest.mark.skipif("needle-alibi" not in trained_models(), reason="zoo:needle-alibi is not shipped")
def test_seed003_alibi_bug_diverges_only_with_cache_and_is_named(tmp_path):
    seed = experiment("seed003_alibi_cache")
    result = seed.run("needle-alibi", tmp_path)
    assert result["uncached"] == result["clean"] != result["cached"]
    plain = result["plain"]
    assert (plain.step, plain.layer, plain.hook) == (1, 0, "transformer.h.0.self_attention")
    assert (result["hooked"].step, result["hooked"].hook) == (1, "blocks.0.attn.hook_pos_bias")
