"""The verifier: every zoo family passes; injected bug classes are caught and localized (mutation tests).

Each mutation is a cache-only bug (active from decode step 1 on, as the real bugs were), injected as a
permanent hook on a fresh model, so the uncached reference stays correct.
"""

from __future__ import annotations

import json

import pytest
import torch

from conftest import hooked
import interp_cache as ic
from interp_cache.cli import main as cli_main
from interp_cache.core.rotary import apply_half_split_rotary
from interp_cache.models.loading import zoo_names
from interp_cache.verify import verify, verify_decode_loop



def greedy_loop(position_ids_at_zero: bool):
    def loop(model, input_ids, attention_mask, max_new_tokens):
        out = model(input_ids, attention_mask=attention_mask, use_cache=True)
        cache, tokens = out.past_key_values, [out.logits[:, -1].argmax(-1, keepdim=True)]
        for _ in range(max_new_tokens - 1):
            attention_mask = torch.cat([attention_mask, torch.ones_like(attention_mask[:, :1])], dim=1)
            extra = {"position_ids": torch.zeros_like(tokens[-1])} if position_ids_at_zero else {}
            out = model(tokens[-1], attention_mask=attention_mask, past_key_values=cache, use_cache=True, **extra)
            tokens.append(out.logits[:, -1].argmax(-1, keepdim=True))
        return torch.cat(tokens, dim=1)

    return loop


def test_a_correct_user_loop_passes():
    report = verify_decode_loop(ic.load("zoo:llama"), greedy_loop(False))
    assert report.passed and report.first_divergence is None
    assert report.rows[0].max_abs_err <= 1e-4


def test_seed_000_positions_stuck_at_zero_are_localized():
    report = verify_decode_loop(ic.load("zoo:llama"), greedy_loop(True))
    assert not report.passed
    divergence = report.first_divergence
    assert (divergence.hook, divergence.step) == ("hook_position_ids", 1)


def off_by_one_loop(model, input_ids, attention_mask, max_new_tokens):
    """Decode steps passed `position_ids = attention_mask.sum(-1)`: one past the token's true position."""
    out = model(input_ids, attention_mask=attention_mask, use_cache=True)
    cache, tokens = out.past_key_values, [out.logits[:, -1].argmax(-1, keepdim=True)]
    for _ in range(max_new_tokens - 1):
        attention_mask = torch.cat([attention_mask, torch.ones_like(attention_mask[:, :1])], dim=1)
        out = model(tokens[-1], attention_mask=attention_mask, past_key_values=cache, use_cache=True,
                    position_ids=attention_mask.sum(-1, keepdim=True))
        tokens.append(out.logits[:, -1].argmax(-1, keepdim=True))
    return torch.cat(tokens, dim=1)


@pytest.mark.parametrize("family", ["bloom", "llama", "gpt2"])
def test_an_off_by_one_position_fails_in_bfloat16_and_is_blamed_on_the_positions(family):
    report = verify_decode_loop(ic.load(f"zoo:{family}", dtype="bfloat16"), off_by_one_loop, max_new_tokens=4)
    assert not report.passed
    divergence = report.first_divergence
    assert (divergence.hook, divergence.step, divergence.layer) == ("hook_position_ids", 1, None)
    assert divergence.row == 0 and divergence.error == 1.0  # exactly one position off, found in the first row
    assert "integer values compare exactly" in report.rows[0].note


def _only_in_decode(transform):
    def hook(activation, hook):
        return transform(activation, hook) if hook.step >= 1 else activation

    return hook


def _mutated(family, hook_name, transform):
    model = ic.load(f"zoo:{family}")
    model.add_perma_hook(hook_name, _only_in_decode(transform))
    return model


def _rerotate_cached_keys(model):
    rotary = model.hf_model.model.rotary_emb

    def transform(keys_bgkd, hook):
        positions = hook.key_positions[:, 0].clamp(min=0)  # [b, k]
        cos, sin = rotary(keys_bgkd, position_ids=positions)
        return apply_half_split_rotary(keys_bgkd.transpose(1, 2), cos, sin).transpose(1, 2)

    return transform


MUTATIONS = {
    # seed 003: the cached step's ALiBi bias taken from the first row of a lower-triangular table (all zero)
    "alibi_first_rows": ("bloom", "blocks.0.attn.hook_pos_bias", lambda bias, hook: torch.zeros_like(bias)),
    # batched decoding that forgets which cached entries are padding
    "missing_padding_mask": ("llama", "blocks.0.cache.hook_positions", lambda pos, hook: pos.clamp(min=0)),
    # KV heads served to the wrong query-head group under GQA
    "gqa_wrong_kv_heads": ("llama", "blocks.1.cache.hook_k_read", lambda keys, hook: keys.flip(1)),
    # OPT's learned positions shifted by its offset of 2
    "opt_position_offset": ("opt", "hook_position_ids", lambda ids, hook: ids + 2),
}


@pytest.mark.parametrize("mutation", list(MUTATIONS) + ["rotary_twice"])
def test_mutations_are_caught_and_localized(mutation):
    if mutation == "rotary_twice":
        family, hook_name = "llama", "blocks.0.cache.hook_k_read"
        model = ic.load("zoo:llama")
        model.add_perma_hook(hook_name, _only_in_decode(_rerotate_cached_keys(model)))
    else:
        family, hook_name, transform = MUTATIONS[mutation]
        model = _mutated(family, hook_name, transform)
    report = verify(model)
    assert not report.passed
    failing = [row.check for row in report.rows if not row.passed and not row.upstream]
    assert "stepwise" in failing and "generate" in failing, failing
    divergence = report.first_divergence
    assert divergence.hook == hook_name
    expected_layer = int(hook_name.split(".")[1]) if hook_name.startswith("blocks.") else None
    assert divergence.layer == expected_layer
    assert divergence.step == 1


def test_every_zoo_family_passes_unmutated_and_cli_writes_reports(tmp_path):
    out_json, out_md = tmp_path / "r.json", tmp_path / "r.md"
    code = cli_main(["verify", "--all", "--json", str(out_json), "--markdown", str(out_md)])
    assert code == 0
    reports = json.loads(out_json.read_text())
    assert len(reports) == len(zoo_names()) and all(r["passed"] for r in reports)
    falcon_alibi = next(r for r in reports if r["model"] == "falcon_alibi")
    eager = next(row for row in falcon_alibi["rows"] if row["check"] == "original[eager]")
    assert eager["upstream"] and not eager["passed"] and eager["max_abs_err"] > 1e-2  # transformers' bug
    assert "upstream finding" in out_md.read_text()
    assert cli_main(["verify", "--model", "zoo:falcon_alibi", "--strict-upstream"]) == 1
    assert {row["status"] for report in reports for row in report["rows"]} == {"pass", "skip", "upstream"}


def test_a_check_that_could_not_run_is_reported_as_skipped_with_its_whole_reason_bloom(capsys):
    assert cli_main(["verify", "--model", "zoo:bloom"]) == 0
    captured = capsys.readouterr()
    assert "[1/1] zoo:bloom agrees (" in captured.err  # progress, model by model
    line = next(line for line in captured.out.splitlines() if "original[sdpa]" in line)
    assert " SKIP " in line and " PASS " not in line
    assert "skipped: transformers offers no sdpa path" in line and line.rstrip().endswith(")")
    assert len(line) > 200  # the reason whole, not cut at 80 characters
    report = verify(ic.load("zoo:bloom"))
    row = next(row for row in report.rows if row.check == "original[sdpa]")
    assert (row.status, row.passed, row.skipped) == ("skip", False, True) and report.passed


def test_bad_inputs_give_clear_errors_and_others_still_run(capsys):
    code = cli_main(["verify", "--model", "zoo:nope", "--model", "zoo:gpt2"])
    captured = capsys.readouterr()
    assert code == 1
    assert "zoo:nope" in captured.err and "the zoo has" in captured.err
    assert "1/2 models agree" in captured.out
    with pytest.raises(ValueError, match="exceed the model's context"):
        verify(ic.load("zoo:gpt2", n_positions=40))


@pytest.mark.parametrize("family,dtype", [("falcon", "bfloat16"), ("bloom", "float16")])
def test_half_precision_runs_pass_within_measured_tolerances(family, dtype):
    report = verify(ic.load(f"zoo:{family}", dtype=dtype))
    assert report.passed, [(r.check, r.max_abs_err, r.note) for r in report.rows if not r.passed]


def test_prompts_of_every_accepted_kind_give_the_same_verdict_gpt2():
    model = hooked("gpt2")
    texts = ["The quick brown fox", "Hi there"]
    enc = model.tokenizer(texts, padding=True, return_tensors="pt")
    reference = verify(model, texts, max_new_tokens=3)
    kinds = [enc, dict(enc), enc["input_ids"], {k: v.tolist() for k, v in enc.items()}]
    for prompts in kinds:
        mask = enc["attention_mask"] if isinstance(prompts, torch.Tensor) else None
        report = verify(model, prompts, max_new_tokens=3, attention_mask=mask)
        assert [(r.check, r.max_abs_err) for r in report.rows] == [(r.check, r.max_abs_err) for r in reference.rows]
    single = verify(model, "The quick brown fox", max_new_tokens=3)
    assert single.passed and next(r for r in single.rows if r.check == "left_padding").max_abs_err == 0.0
    assert verify_decode_loop(model, greedy_loop(False), dict(enc), max_new_tokens=3).passed
    assert verify_decode_loop(model, greedy_loop(False), "The quick brown fox", max_new_tokens=3).passed


@pytest.mark.parametrize("prompts, kwargs, error, message", [
    ({"input_ids": None, "x": 1} | {}, {}, TypeError, "'input_ids' must be a tensor or a list of lists of ints"),
    ({"attention_mask": torch.ones(1, 3)}, {}, TypeError, "a dict of prompts needs 'input_ids'"),
    ([1, 2, 3], {}, TypeError, "got a list of int"),
    ({"a", "b"}, {}, TypeError, "got set"),
    ([], {}, TypeError, "got an empty list"),
    (["fine", ""], {}, TypeError, "an empty string"),
    (7, {}, TypeError, "got int"),
    (torch.ones(3, dtype=torch.long), {}, TypeError, r"integer tensor \[batch, tokens\]"),
    (torch.ones(1, 3), {}, TypeError, r"integer tensor \[batch, tokens\]"),
    (torch.ones(1, 3, dtype=torch.long), {"attention_mask": torch.ones(1, 2)}, TypeError, "of the input_ids' shape"),
    (torch.ones(1, 3, dtype=torch.long), {"attention_mask": torch.tensor([[1, 1, 0]])}, ValueError, "right-padded"),
    (["text"], {"attention_mask": torch.ones(1, 4)}, TypeError, "goes with an input_ids tensor"),
])
def test_prompts_of_any_other_kind_are_refused_saying_what_is_accepted_gpt2(prompts, kwargs, error, message):
    model = hooked("gpt2")
    if isinstance(prompts, dict) and prompts.get("input_ids", 0) is None:
        prompts = {"input_ids": ["not", "a tensor"]}
    with pytest.raises(error, match=message):
        verify(model, prompts, max_new_tokens=2, **kwargs)
    with pytest.raises(error, match=message):
        verify_decode_loop(model, lambda *a: None, prompts, max_new_tokens=2, **kwargs)
