"""Per family (all 14 zoo models): the hooked model computes the original's function, cached decoding
reproduces the full forward, and hooks that do nothing change nothing."""

from __future__ import annotations

import pytest
import torch

from conftest import hooked, original, original_logits, padded_batch

NEW_TOKENS = 32


def test_logits_match_original_with_left_padding(family):
    model = hooked(family)
    input_ids, attention_mask = padded_batch(model)
    expected = original_logits(original(family), input_ids, attention_mask)
    with torch.no_grad():
        got = model(input_ids, attention_mask=attention_mask).logits
    real = attention_mask.bool()
    assert (got - expected).abs()[real].max().item() <= 1e-5


def test_greedy_generation_matches_original(family):
    model = hooked(family)
    input_ids, attention_mask = padded_batch(model)
    with torch.no_grad():
        expected = original(family).generate(
            input_ids, attention_mask=attention_mask, max_new_tokens=NEW_TOKENS, do_sample=False,
            pad_token_id=model.tokenizer.pad_token_id,
        )
    got = model.generate(input_ids, attention_mask=attention_mask, max_new_tokens=NEW_TOKENS, do_sample=False)
    assert torch.equal(got, expected)


@pytest.mark.parametrize("chunk", [1, 3])
def test_cached_chunks_reproduce_full_forward(family, chunk):
    model = hooked(family)
    input_ids, attention_mask = padded_batch(model)
    with torch.no_grad():
        full = model(input_ids, attention_mask=attention_mask).logits
        cache = model.new_cache()
        pieces = []
        for start in range(0, input_ids.shape[1], chunk):
            end = min(start + chunk, input_ids.shape[1])
            out = model(
                input_ids[:, start:end], attention_mask=attention_mask[:, :end], past_key_values=cache, use_cache=True
            )
            pieces.append(out.logits)
    stepped = torch.cat(pieces, dim=1)
    real = attention_mask.bool()
    assert (stepped - full).abs()[real].max().item() <= 1e-4
    assert cache.logical_length == input_ids.shape[1]


def test_generate_with_and_without_cache_agree(family):
    model = hooked(family)
    input_ids, attention_mask = padded_batch(model)
    cached = model.generate(input_ids, attention_mask=attention_mask, max_new_tokens=16, do_sample=False)
    uncached = model.generate(
        input_ids, attention_mask=attention_mask, max_new_tokens=16, do_sample=False, use_cache=False
    )
    assert torch.equal(cached, uncached)


def test_noop_hook_on_every_point_changes_no_logit(family):
    model = hooked(family)
    input_ids, attention_mask = padded_batch(model)
    calls = []

    def noop(activation, hook):
        calls.append(hook.name)
        return activation

    with torch.no_grad():
        plain = model(input_ids, attention_mask=attention_mask).logits
        hooked_logits = model.run_with_hooks(
            input_ids, attention_mask=attention_mask, fwd_hooks=[(lambda name: True, noop)]
        ).logits
    # Score/pattern hooks move the layer to the explicit path; compare that path with no hooks attached.
    model.set_explicit_attention(True)
    try:
        with torch.no_grad():
            explicit = model(input_ids, attention_mask=attention_mask).logits
    finally:
        model.set_explicit_attention(False)
    assert torch.equal(hooked_logits, explicit)
    assert (plain - explicit).abs()[attention_mask.bool()].max().item() <= 1e-5
    never_called = {"blocks.0.cache.hook_scores", "blocks.0.cache.hook_keep"}  # compression policies only
    expected = {n for n in model.hook_dict if not n.endswith(("hook_scores", "hook_keep"))}
    assert expected <= set(calls), sorted(expected - set(calls))
    assert not never_called & set(calls)


def test_beam_search_with_cache_equals_without(family):
    model = hooked(family)
    input_ids, attention_mask = padded_batch(model)
    kwargs = dict(attention_mask=attention_mask, max_new_tokens=8, num_beams=4, do_sample=False)
    assert torch.equal(model.generate(input_ids, **kwargs), model.generate(input_ids, use_cache=False, **kwargs))


def test_hook_shapes_follow_the_design(family):
    model = hooked(family)
    cfg = model.config
    input_ids, attention_mask = padded_batch(model)
    b, p = input_ids.shape
    spec = model.runners[0].spec
    h, g, d = spec.num_heads, spec.num_kv_heads, spec.head_dim
    _, cache = model.run_with_cache(input_ids, attention_mask=attention_mask)
    m = cache["hook_embed"].shape[-1]
    assert cache["hook_position_ids"].shape == (b, p)
    assert cache["blocks.0.hook_resid_pre"].shape == (b, p, m)
    assert cache["blocks.0.attn.hook_q"].shape == (b, p, h, d)
    assert cache["blocks.0.attn.hook_k"].shape == (b, p, g, d)
    assert cache["blocks.0.attn.hook_pattern"].shape == (b, h, p, p)
    assert cache["blocks.0.attn.hook_z"].shape == (b, p, h, d)
    assert cache["blocks.0.cache.hook_k_write"].shape == (b, g, p, d)
    assert cache["blocks.0.cache.hook_positions"].shape == (b, g, p)
    assert cache["blocks.0.hook_attn_out"].shape == (b, p, m)
    names = set(model.hook_dict)
    assert ("blocks.0.attn.hook_rot_q" in names) == model.adapter.rotary
    assert ("blocks.0.attn.hook_pos_bias" in names) == model.adapter.alibi
    assert ("hook_pos_embed" in names) == model.adapter.learned_positions
    if model.adapter.alibi:
        assert cache["blocks.0.attn.hook_pos_bias"].shape == (b, h, p, p)
    del cfg
