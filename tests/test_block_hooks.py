"""The points beyond attention: blocks.{i}.hook_mlp_out, blocks.{i}.hook_resid_mid, ln_final.hook_normalized.

Same names in every family; each family's block layout is checked against what its block computes
(resid_post = resid_mid + mlp_out, bitwise, where the block is sequential and pre-norm), and a patch of
resid_mid must reach the MLP and the residual stream both: patching in another prompt's resid_mid at every
position gives that prompt's logits exactly.
"""

from __future__ import annotations

import pytest
import torch

from conftest import FAMILIES, hooked, padded_batch

OTHER_PROMPTS = ["A completely different sentence here.", "And another one"]


def _record(model, names, input_ids, attention_mask):
    with torch.no_grad():
        logits, cache = model.run_with_cache(input_ids, attention_mask=attention_mask, names_filter=lambda n: n in names)
    return logits, cache


def _sequential_pre_norm(model) -> bool:
    config = model.config
    return model.block_layout.resid_mid is not None and getattr(config, "do_layer_norm_before", True)


def test_the_same_names_exist_in_every_family_and_parallel_blocks_say_why_resid_mid_is_absent(family):
    model = hooked(family)
    last = model.num_layers - 1
    assert f"blocks.{last}.hook_mlp_out" in model.hook_dict
    final = "ln_final.hook_normalized" in model.hook_dict
    assert final == (model.block_layout.final_norm is not None)
    assert final or family == "opt" and not model.config.do_layer_norm_before
    if model.block_layout.resid_mid is None:
        assert "parallel" in model.block_layout.absent
        with pytest.raises(ValueError, match="no hook point named 'blocks.0.hook_resid_mid'"):
            model.hook_point("blocks.0.hook_resid_mid")


def test_resid_post_is_resid_mid_plus_mlp_out_or_the_parallel_sum(family):
    model = hooked(family)
    input_ids, attention_mask = padded_batch(model)
    layer = model.num_layers - 1
    names = {f"blocks.{layer}.{point}" for point in ("hook_resid_pre", "hook_attn_out", "hook_resid_mid",
                                                        "hook_mlp_out", "hook_resid_post")}
    _, cache = _record(model, names, input_ids, attention_mask)
    post, mlp_out = cache[f"blocks.{layer}.hook_resid_post"], cache[f"blocks.{layer}.hook_mlp_out"]
    if _sequential_pre_norm(model):
        assert torch.equal(post, cache[f"blocks.{layer}.hook_resid_mid"] + mlp_out)
    elif model.block_layout.resid_mid is None:
        parallel_sum = cache[f"blocks.{layer}.hook_resid_pre"] + cache[f"blocks.{layer}.hook_attn_out"] + mlp_out
        assert (post - parallel_sum).abs().max().item() <= 1e-5
    else:
        pytest.skip(f"{family} zoo config is post-norm: resid_post = LN(resid_mid + mlp_out)")


@pytest.mark.parametrize("layer", [0, -1])
def test_patching_resid_mid_at_every_position_gives_the_other_prompts_logits(family, layer):
    model = hooked(family)
    if "blocks.0.hook_resid_mid" not in model.hook_dict:
        pytest.skip(f"{family}: {model.block_layout.absent}")
    layer = layer % model.num_layers
    name = f"blocks.{layer}.hook_resid_mid"
    input_ids, attention_mask = padded_batch(model)
    other_ids, other_mask = padded_batch(model, OTHER_PROMPTS)
    width = min(input_ids.shape[1], other_ids.shape[1])
    input_ids, attention_mask = input_ids[:, -width:], torch.ones(2, width, dtype=torch.long)
    other_ids = other_ids[:, -width:]
    other_logits, cache = _record(model, {name}, other_ids, torch.ones(2, width, dtype=torch.long))
    with torch.no_grad():
        patched = model.run_with_hooks(input_ids, attention_mask=attention_mask, return_type="logits",
                                       fwd_hooks=[(name, lambda x, hook: cache[name])])
    assert torch.equal(patched, other_logits)
    with torch.no_grad():  # a site's torch hook goes at the next forward once its point has no hook left
        assert torch.equal(model(other_ids, return_type="logits"), other_logits)
    assert all(not m._forward_pre_hooks and not m._forward_hooks
               for layer in model.adapter.decoder_layers(model.hf_model) for m in layer.modules())


def test_zero_ablating_mlp_out_leaves_resid_post_equal_to_resid_mid(family):
    model = hooked(family)
    if not _sequential_pre_norm(model):
        pytest.skip(f"{family}: no sequential pre-norm block in the zoo config")
    input_ids, attention_mask = padded_batch(model)
    names = {"blocks.0.hook_resid_mid", "blocks.0.hook_resid_post"}
    with torch.no_grad(), model.hooks(fwd_hooks=[("blocks.0.hook_mlp_out", lambda x, hook: torch.zeros_like(x))]):
        _, cache = _record(model, names, input_ids, attention_mask)
    assert torch.equal(cache["blocks.0.hook_resid_post"], cache["blocks.0.hook_resid_mid"])


def test_ln_final_patched_from_another_prompt_gives_its_logits(family):
    model = hooked(family)
    if "ln_final.hook_normalized" not in model.hook_dict:
        pytest.skip(f"{family}: {model.block_layout.absent}")
    input_ids, _ = padded_batch(model)
    other_ids = torch.flip(input_ids, dims=[1])
    other_logits, cache = _record(model, {"ln_final.hook_normalized"}, other_ids, None)
    with torch.no_grad():
        patched = model.run_with_hooks(input_ids, return_type="logits", fwd_hooks=[
            ("ln_final.hook_normalized", lambda x, hook: cache["ln_final.hook_normalized"])])
    assert torch.equal(patched, other_logits)


def test_a_patch_does_not_write_into_the_callers_tensor_falcon():
    """Falcon's parallel block adds attention to the MLP output in place: the caller's replacement is copied."""
    model = hooked("falcon")
    input_ids, attention_mask = padded_batch(model)
    _, cache = _record(model, {"blocks.0.hook_mlp_out"}, input_ids, attention_mask)
    replacement = cache["blocks.0.hook_mlp_out"].clone()
    kept = replacement.clone()
    with torch.no_grad():
        model.run_with_hooks(input_ids, attention_mask=attention_mask,
                             fwd_hooks=[("blocks.0.hook_mlp_out", lambda x, hook: replacement)])
    assert torch.equal(replacement, kept)


def test_idle_block_points_leave_no_torch_hook_on_any_module():
    for family in FAMILIES:
        model = hooked(family)
        with torch.no_grad():  # sites synced: any torch hook left from an earlier test's hooks goes now
            model(padded_batch(model)[0])
        assert all(not m._forward_pre_hooks and not m._forward_hooks
                   for layer in model.adapter.decoder_layers(model.hf_model) for m in layer.modules()), family
