"""The generic path (`adapters/attention_interface.py`): families whose attention calls transformers'
attention interface, served without an adapter of their own -- phi3, gemma3_text, olmo2 declared, any
other such family undeclared -- and what it refuses.

(The family-wide checks -- hooked vs original, cached vs uncached, generate, no-op hooks, compression --
run over every zoo family in test_families.py; real checkpoint configs in test_checkpoint_configs.py.)
"""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest
import torch
import transformers as tf

import interp_cache as ic
from conftest import hooked, original_logits, padded_batch
from interp_cache.adapters.attention_interface import INTERFACE_NAME, InterfaceRefused
from interp_cache.adapters.registry import family_of
from interp_cache.models.tokenizer import BOS_ID, EOS_ID, PAD_ID, VOCAB_SIZE
from interp_cache.models.zoo import build_zoo_model

GENERIC = ["phi3", "gemma3_text", "olmo2"]
EXPERIMENTS = Path(__file__).resolve().parent.parent / "experiments"


def _experiment(name: str):
    spec = importlib.util.spec_from_file_location(name, EXPERIMENTS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("family", GENERIC)
def test_zeroed_keys_give_a_uniform_pattern_and_zeroed_values_a_zero_z(family):
    """hook_k and hook_v sit on the projections the module really uses (Phi-3: its fused q|k|v split)."""
    model = hooked(family)
    input_ids, attention_mask = padded_batch(model)
    zero = [(f"blocks.0.attn.hook_{name}", lambda x, hook: torch.zeros_like(x)) for name in ("k", "v")]
    with torch.no_grad(), model.hooks(fwd_hooks=zero), model.record(["blocks.0.attn.hook_pattern",
                                                                      "blocks.0.attn.hook_z"]) as rec:
        model(input_ids, attention_mask=attention_mask)
    pattern = rec["blocks.0.attn.hook_pattern"][0].activation  # [b, h, p, k]
    visible = pattern > 0
    uniform = 1.0 / visible.sum(-1, keepdim=True)
    assert (pattern - uniform).masked_fill(~visible, 0).abs().max().item() <= 1e-6
    assert rec["blocks.0.attn.hook_z"][0].activation.abs().max().item() == 0.0


@pytest.mark.parametrize("family", GENERIC)
def test_unwrap_restores_the_attention_implementation_and_the_original_function(family):
    model = ic.load(f"zoo:{family}")
    hf_model = model.hf_model
    assert hf_model.config._attn_implementation == INTERFACE_NAME
    input_ids, attention_mask = padded_batch(model)
    hf_model = model.unwrap()
    assert hf_model.config._attn_implementation == "sdpa"
    reference = build_zoo_model(family)
    with torch.no_grad():
        difference = original_logits(hf_model, input_ids, attention_mask) - original_logits(reference, input_ids, attention_mask)
    assert difference.abs().max().item() == 0.0
    module = hf_model.model.layers[0].self_attn
    assert "_interp_cache_binding" not in module.__dict__


def test_the_interface_outside_a_hooked_model_says_so_olmo2():
    hf_model = build_zoo_model("olmo2")
    hf_model.set_attn_implementation(INTERFACE_NAME)
    with pytest.raises(RuntimeError, match="computes attention inside a HookedModel only"):
        hf_model(torch.tensor([[1, 2, 3]]))


def test_a_hooked_cache_refuses_writes_from_an_unwrapped_generic_model_phi3():
    model = ic.load("zoo:phi3")
    cache = model.new_cache()
    hf_model = model.unwrap()
    with pytest.raises(RuntimeError, match="not wrapped by HookedModel"):
        hf_model(torch.tensor([[1, 2, 3]]), past_key_values=cache, use_cache=True)


def test_bidirectional_attention_is_refused_gemma3_text():
    config = tf.Gemma3TextConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                                 num_key_value_heads=2, head_dim=16, use_bidirectional_attention=True,
                                 vocab_size=VOCAB_SIZE, pad_token_id=PAD_ID, bos_token_id=BOS_ID, eos_token_id=EOS_ID)
    with pytest.raises(InterfaceRefused, match="attends bidirectionally"):
        ic.load(tf.AutoModelForCausalLM.from_config(config).eval())


def test_an_unsupported_model_is_refused_before_its_weights_load_and_the_message_names_the_generic_path():
    with pytest.raises(ic.UnsupportedArchitectureError, match="generic path"):
        family_of(tf.T5Config())  # the config alone decides: no model is built


def test_generic_families_quick_mode_passes_two_families_and_refuses_attention_sinks(tmp_path):
    study = _experiment("generic_families")
    study.main(["--quick", "--out", str(tmp_path), "--threads", "1"])
    rows = {row["model_type"]: row for row in json.loads((tmp_path / "generic_families.json").read_text())}
    assert set(rows) == set(study.QUICK_FAMILIES)
    assert rows["granite"]["status"] == rows["starcoder2"]["status"] == "pass"
    assert rows["granite"]["max_abs_err"] <= 1e-4
    assert rows["gpt_oss"]["status"] == "refused" and "s_aux" in rows["gpt_oss"]["note"]
    assert (tmp_path / "generic_families.md").read_text().count("\n| ") == 1 + len(rows)
