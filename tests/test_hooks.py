"""Hook contract: step and positions visible to hooks, removal after errors, shape errors, isolation."""

from __future__ import annotations

import pytest
import torch

import interp_cache as ic
from conftest import hooked, original, original_logits, padded_batch
import torch.nn.functional as F
from transformer_lens import ActivationCache

from interp_cache.core.hook_points import NonFiniteHookOutput
from interp_cache.models.zoo import build_zoo_model


def test_hooks_see_decode_step_and_true_positions():
    model = hooked("llama")
    input_ids, attention_mask = padded_batch(model)
    seen = []

    def record(activation, hook):
        seen.append((hook.step, hook.positions.clone(), hook.key_positions.shape))

    with model.hooks(fwd_hooks=[("blocks.1.attn.hook_pattern", record)]):
        model.generate(input_ids, attention_mask=attention_mask, max_new_tokens=3, do_sample=False, eos_token_id=None)
    assert [s for s, _, _ in seen] == [0, 1, 2]
    prompt_len = input_ids.shape[1]
    pads = int((attention_mask[1] == 0).sum())
    assert torch.equal(seen[1][1], torch.tensor([[prompt_len], [prompt_len - pads]]))
    assert seen[2][2] == (2, model.runners[1].spec.num_kv_heads, prompt_len + 2)


def test_hooks_are_removed_after_a_run_that_raises():
    model = hooked("gpt2")
    input_ids, attention_mask = padded_batch(model)

    def boom(activation, hook):
        raise RuntimeError("boom")

    cache = model.new_cache()
    with pytest.raises(RuntimeError, match="boom"):
        model.run_with_hooks(input_ids, attention_mask=attention_mask, past_key_values=cache, use_cache=True,
                             fwd_hooks=[("blocks.1.hook_attn_out", boom)])
    assert all(not point._forward_hooks for point in model.hook_dict.values())
    assert model.context is None
    assert cache.logical_length == 0 and cache.physical_lengths == [0, 0]  # the failed forward was undone
    with torch.no_grad():
        model(input_ids, attention_mask=attention_mask)


def test_wrong_shape_replacement_names_the_hook_and_both_shapes():
    model = hooked("llama")
    input_ids, attention_mask = padded_batch(model)
    with pytest.raises(ic.HookShapeError, match=r"blocks\.0\.attn\.hook_q.*returned shape \(2, 43, 4, 15\).*expected shape \(2, 43, 4, 16\)"):
        model.run_with_hooks(input_ids, attention_mask=attention_mask,
                             fwd_hooks=[("blocks.0.attn.hook_q", lambda a, hook: a[..., :15])])


def test_patching_a_hook_changes_logits():
    model = hooked("llama")
    input_ids, attention_mask = padded_batch(model)
    with torch.no_grad():
        clean = model(input_ids, attention_mask=attention_mask).logits
        patched = model.run_with_hooks(input_ids, attention_mask=attention_mask,
                                       fwd_hooks=[("blocks.0.attn.hook_z", lambda z, hook: torch.zeros_like(z))]).logits
    assert (clean - patched).abs().max().item() > 1e-2


def test_a_second_unwrapped_model_keeps_the_original_function():
    model = hooked("llama")
    fresh = build_zoo_model("llama")
    assert "forward" not in fresh.model.layers[0].self_attn.__dict__
    input_ids, attention_mask = padded_batch(model)
    expected = original_logits(original("llama"), input_ids, attention_mask)
    assert torch.equal(original_logits(fresh, input_ids, attention_mask), expected)


def test_unsupported_architecture_names_the_supported_families():
    from transformers import T5Config

    with pytest.raises(ic.UnsupportedArchitectureError, match="supported families: gpt2, gpt_neo, opt, .*mpt, and any other decoder whose attention calls"):
        ic.HookedModel(torch.nn.Module.__new__(type("Fake", (torch.nn.Module,), {"config": T5Config()})))
    with pytest.raises(ValueError, match="the zoo has: gpt2"):
        ic.load("zoo:t5")


def test_foreign_cache_and_bad_masks_are_rejected():
    from transformers import DynamicCache

    model = hooked("llama")
    input_ids, attention_mask = padded_batch(model)
    filled = DynamicCache()
    filled.update(torch.zeros(2, 2, 3, 16), torch.zeros(2, 2, 3, 16), 0)
    with pytest.raises(TypeError, match="must be a HookedCache"):
        model(input_ids, attention_mask=attention_mask, past_key_values=filled, use_cache=True)
    with pytest.raises(ValueError, match="attention_mask has shape"):
        model(input_ids, attention_mask=attention_mask[:, 1:])
    assert model.context is None


def test_a_local_checkpoint_loads_through_the_same_code(tmp_path):
    """A saved zoo bloom reloads from its path and computes what the zoo model computes."""
    from interp_cache.models.tokenizer import ByteTokenizer

    build_zoo_model("bloom").save_pretrained(tmp_path)
    from_path = ic.load(str(tmp_path), dtype="float32", tokenizer=ByteTokenizer())
    model = hooked("bloom")
    assert from_path.family == "bloom"
    input_ids, attention_mask = padded_batch(model)
    with torch.no_grad():
        assert torch.equal(from_path(input_ids, attention_mask=attention_mask).logits,
                           model(input_ids, attention_mask=attention_mask).logits)


def test_attaching_a_hook_by_an_unknown_name_or_a_wrong_signature_is_refused_before_running_llama():
    model = hooked("llama")
    input_ids, attention_mask = padded_batch(model)
    with pytest.raises(ValueError, match=r"no hook point named 'blocks.0.attn.hook_patern'.*close matches: "
                                         r"blocks.0.attn.hook_pattern"):
        with model.hooks(fwd_hooks=[("blocks.0.attn.hook_patern", lambda activation, hook: None)]):
            model(input_ids, attention_mask=attention_mask)
    with pytest.raises(TypeError, match=r"second parameter must be named 'hook'; .*<lambda>' takes \(a, h\)"):
        model.run_with_hooks(input_ids, attention_mask=attention_mask,
                             fwd_hooks=[("blocks.0.attn.hook_z", lambda a, h: None)])
    with pytest.raises(ValueError, match="close matches: blocks.1.hook_resid_post"):
        model.add_hook("blocks.1.hook_resid_posts", lambda activation, hook: None)
    assert sum(len(point._forward_hooks) for point in model.hook_dict.values()) == 0
    model.add_hook("blocks.1.hook_resid_post", lambda activation, **kwargs: None)  # **kwargs takes hook=
    model.reset_hooks()


def test_unwrap_gives_the_transformers_model_its_own_forward_back_bloom():
    model = ic.load("zoo:bloom")
    input_ids, attention_mask = padded_batch(model)
    with model.hooks(fwd_hooks=[("blocks.0.hook_resid_pre", lambda activation, hook: activation)]):
        hooked_logits = model(input_ids, attention_mask=attention_mask).logits  # installs a residual-stream hook
    model.add_hook("hook_embed", lambda activation, hook: activation * 0)  # left attached on purpose
    hf_model = model.unwrap()
    assert all("forward" not in layer.self_attention.__dict__ for layer in hf_model.transformer.h)
    assert not hf_model._forward_pre_hooks and not hf_model._forward_hooks
    assert not any(layer._forward_pre_hooks for layer in hf_model.transformer.h)
    assert not hf_model.transformer.word_embeddings._forward_hooks
    expected = original_logits(original("bloom"), input_ids, attention_mask)
    assert torch.equal(original_logits(hf_model, input_ids, attention_mask), expected)
    assert (hooked_logits - expected).abs().max() <= 1e-5
    with pytest.raises(RuntimeError, match="this HookedModel was unwrapped"):
        model(input_ids)
    with pytest.raises(RuntimeError, match="this HookedModel was unwrapped"):
        model.generate(input_ids, max_new_tokens=1)


@pytest.mark.parametrize("family", ["llama", "bloom"])
def test_nan_or_inf_returned_by_a_hook_stops_the_run_naming_hook_step_and_position(family):
    model = hooked(family)
    ids, mask = padded_batch(model)

    def poison(value):
        def hook(activation, hook):
            if hook.step == 2:
                activation = activation.clone()
                activation[1, -1, 0] = value
            return activation
        return hook

    for value, what in ((float("nan"), "NaN"), (float("inf"), "inf")):
        with pytest.raises(NonFiniteHookOutput, match=rf"'blocks.0.hook_resid_pre' returned {what} at decode step 2, "
                           rf"batch 1, token 0, model 0, absolute position \d+"):
            with model.hooks(fwd_hooks=[("blocks.0.hook_resid_pre", poison(value))]):
                model.generate(ids, attention_mask=mask, max_new_tokens=4)
        assert not model.blocks[0].hook_resid_pre.is_hooked()  # removed although the run raised


def test_minus_inf_scores_hide_entries_and_the_check_can_be_turned_off_llama():
    model = hooked("llama")
    ids, mask = padded_batch(model)

    def hide_first_entry(scores, hook):
        scores = scores.clone()
        scores[..., 0] = float("-inf")  # allowed: the scores layout gives -inf a meaning
        return scores

    with model.hooks(fwd_hooks=[("blocks.1.attn.hook_attn_scores", hide_first_entry)]):
        model(ids, attention_mask=mask)
    with pytest.raises(NonFiniteHookOutput, match="'blocks.1.attn.hook_pattern' returned NaN"):
        with model.hooks(fwd_hooks=[("blocks.1.attn.hook_pattern", lambda p, hook: p * float("nan"))]):
            model(ids, attention_mask=mask)
    model.check_hook_outputs = False
    try:
        with model.hooks(fwd_hooks=[("blocks.1.attn.hook_pattern", lambda p, hook: p * float("nan"))]):
            logits = model(ids, attention_mask=mask).logits
        assert torch.isnan(logits).any()  # nothing stopped it: the documented switch
    finally:
        model.check_hook_outputs = True
    with pytest.raises(TypeError, match="True or False"):
        model.check_hook_outputs = 1


def test_a_hook_that_writes_nan_in_place_and_returns_the_same_tensor_is_caught_too_qwen2():
    """Hooks that only read are not scanned (the activation is the model's own); an in-place edit is."""
    model = hooked("qwen2")
    ids, mask = padded_batch(model)

    def zero_head_then_poison(activation, hook):
        activation[:, :, 0] = 0.0
        activation[0, 0, 1] = float("nan")
        return activation

    with pytest.raises(NonFiniteHookOutput, match="'blocks.0.attn.hook_z' returned NaN"):
        with model.hooks(fwd_hooks=[("blocks.0.attn.hook_z", zero_head_then_poison)]):
            model(ids, attention_mask=mask)
    with torch.inference_mode(), pytest.raises(NonFiniteHookOutput, match="'blocks.0.attn.hook_z' returned NaN"):
        with model.hooks(fwd_hooks=[("blocks.0.attn.hook_z", zero_head_then_poison)]):
            model(ids, attention_mask=mask)


def test_nan_in_padding_slots_is_refused_too_it_would_reach_real_tokens_gpt2():
    """Attention weighs padding ~0, but 0 * NaN is NaN: with the check off, NaN written only into padding
    slots reaches the real tokens' logits."""
    model = hooked("gpt2")
    ids, mask = padded_batch(model)
    pad_row = int((mask == 0).any(-1).nonzero()[0])

    def nan_in_padding(activation, hook):
        activation = activation.clone()
        activation[hook.is_padding] = float("nan")
        return activation

    with pytest.raises(NonFiniteHookOutput, match=f"returned NaN at decode step 0, batch {pad_row}, token 0"):
        with model.hooks(fwd_hooks=[("blocks.1.hook_resid_pre", nan_in_padding)]):
            model(ids, attention_mask=mask)
    model.check_hook_outputs = False
    try:
        with model.hooks(fwd_hooks=[("blocks.1.hook_resid_pre", nan_in_padding)]):
            out = model(ids, attention_mask=mask).logits
    finally:
        model.check_hook_outputs = True
    assert torch.isnan(out[pad_row, mask[pad_row].bool()]).all()


def test_transformer_lens_habits_run_with_cache_cfg_tokens_text_and_return_type_llama():
    model = hooked("llama")
    logits, cache = model.run_with_cache("The quick brown fox")
    assert isinstance(cache, ActivationCache) and isinstance(logits, torch.Tensor)
    ids = model.to_tokens("The quick brown fox")
    assert (logits - model(ids).logits).abs().max() <= 1e-5  # (recording patterns takes the explicit path)
    assert torch.equal(cache["pattern", 1], cache["blocks.1.attn.hook_pattern"])
    assert cache["pattern", 1].shape == (1, model.cfg.n_heads, ids.shape[1], ids.shape[1])
    cfg = model.cfg
    assert (cfg.n_layers, cfg.n_heads, cfg.d_model, cfg.d_head, cfg.d_vocab, cfg.n_key_value_heads) == (2, 4, 64, 16, 260, 2)
    assert model.to_string(ids[0]) == "The quick brown fox"
    assert model.to_string(model.to_tokens(["a b", "hello"])) == ["a b", "hello"]
    loss = model("The quick brown fox", return_type="loss")
    manual = F.cross_entropy(logits[0, :-1], ids[0, 1:])
    assert torch.allclose(loss, manual, atol=1e-5)
    both = model.run_with_hooks("The quick brown fox", return_type="both", fwd_hooks=[])
    assert (both[0] - logits).abs().max() <= 1e-5 and torch.allclose(both[1], manual, atol=1e-5)
    assert model(ids, return_type=None) is None
    with pytest.raises(ValueError, match="return_type must be one of"):
        model(ids, return_type="logprobs")
    text = model.generate("The quick", max_new_tokens=3, do_sample=False)
    expected = model.generate(model.to_tokens("The quick"), max_new_tokens=3, do_sample=False)
    assert text == model.to_string(expected[0])
    with pytest.raises(TypeError, match="takes a string or a non-empty list of strings"):
        model.to_tokens(5)


@pytest.mark.parametrize("family", ["llama", "bloom", "gemma2"])
def test_recorded_scores_are_the_textbook_formula_bit_for_bit(family):
    """`hook_attn_scores` holds `(q @ k^T) * scaling`, softcapped as `tanh(s / c) * c`, plus the ALiBi bias,
    bit for bit, wherever an entry is visible: the core forms them in place on the matmul's output (one
    [b, h, p, k] allocation instead of three), which must not change a value. GQA (llama), ALiBi (bloom),
    softcapping (gemma2); a left-padded prefill and two decode steps."""
    model = hooked(family)
    ids, mask = padded_batch(model)
    spec = model.runners[0].spec
    query_name = "blocks.0.attn.hook_rot_q" if "blocks.0.attn.hook_rot_q" in model.hook_dict else "blocks.0.attn.hook_q"
    names = [query_name, "blocks.0.cache.hook_k_read", "blocks.0.attn.hook_attn_scores"]
    if spec.uses_alibi:
        names.append("blocks.0.attn.hook_pos_bias")
    with model.record(names) as rec:
        model.generate(ids, attention_mask=mask, max_new_tokens=3, min_new_tokens=3, do_sample=False)
    r = spec.num_heads // spec.num_kv_heads
    for step, scores in enumerate(rec["blocks.0.attn.hook_attn_scores"]):
        query_bhpd = rec[query_name][step].activation.transpose(1, 2)
        keys_bgkd = rec["blocks.0.cache.hook_k_read"][step].activation
        b, h, p, d = query_bhpd.shape
        g, k = keys_bgkd.shape[1], keys_bgkd.shape[2]
        expected = torch.matmul(query_bhpd.reshape(b, g, r * p, d), keys_bgkd.transpose(-1, -2)).view(b, h, p, k)
        expected = expected * spec.scaling
        if spec.softcap is not None:
            expected = torch.tanh(expected / spec.softcap) * spec.softcap
        if spec.uses_alibi:
            expected = expected + rec["blocks.0.attn.hook_pos_bias"][step].activation
        visible = scores.activation > torch.finfo(scores.activation.dtype).min
        assert int(visible.sum()) > 0
        assert torch.equal(scores.activation[visible], expected[visible]), (family, step)
