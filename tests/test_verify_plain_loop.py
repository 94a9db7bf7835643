"""`verify_decode_loop` on plain transformers models: the user's own loop, cache class and attention, with
bugs injected into the plain model (never through this library's hooks), each localized to its step and
layer; correct loops pass with transformers' cache classes and attention implementations."""

from __future__ import annotations

import pytest
import torch
from transformers import DynamicCache, StaticCache

import interp_cache as ic
from interp_cache.models.zoo import build_zoo_model
from interp_cache.verify import verify_decode_loop
from interp_cache.verify.module_probe import ModuleProbe
from interp_cache.verify.runs import padding_aware_position_ids

PROMPT_LENGTH, NEW_TOKENS = 12, 6


def prompt_batch(batch: int = 2):
    ids = torch.randint(5, 200, (batch, PROMPT_LENGTH), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    mask[1:, :3] = 0  # the second row is left-padded
    return ids, mask


def greedy_loop(make_cache=lambda model: DynamicCache(config=model.config), next_positions=None,
                pass_mask: bool = True, extend_mask_from_step: int = 0):
    """The classic hand-written loop: prefill, then the new token and `past_key_values` per step.
    `next_positions(last, step)` replaces the correct `last + 1` (a positional bug)."""

    def loop(model, input_ids, attention_mask, max_new_tokens):
        cache = make_cache(model)
        positions = padding_aware_position_ids(attention_mask)
        mask = attention_mask if pass_mask else None
        out = model(input_ids, attention_mask=mask, position_ids=positions if pass_mask else None,
                    past_key_values=cache, use_cache=True)
        last = positions[:, -1:]
        for step in range(max_new_tokens - 1):
            token = out.logits[:, -1].argmax(-1, keepdim=True)
            if pass_mask and step >= extend_mask_from_step:
                mask = torch.cat([mask, mask.new_ones(mask.shape[0], 1)], dim=1)
            last = next_positions(last, step) if next_positions else last + 1
            out = model(token, attention_mask=mask, position_ids=last if pass_mask else None,
                        past_key_values=cache, use_cache=True)

    return loop


def generate_loop(model, input_ids, attention_mask, max_new_tokens):
    model.generate(input_ids, attention_mask=attention_mask, max_new_tokens=max_new_tokens, do_sample=False,
                   pad_token_id=0)


def departure(report):
    assert not report.passed
    return report.rows[0].first_divergence


# -- correct loops pass ----------------------------------------------------------------------------------
@pytest.mark.parametrize(("family", "attn_implementation"), [
    (family, implementation) for family in ("llama", "gpt2", "bloom", "qwen2") for implementation in ("eager", "sdpa")
    if (family, implementation) != ("bloom", "sdpa")  # Bloom has no SDPA in transformers
])
def test_correct_loop_on_a_plain_model_passes(family, attn_implementation):
    model = build_zoo_model(family, attn_implementation=attn_implementation)
    ids, mask = prompt_batch()
    report = verify_decode_loop(model, greedy_loop(), ids, NEW_TOKENS, attention_mask=mask)
    assert report.passed, report.rows[0].note
    assert report.rows[0].max_abs_err < 1e-4


@pytest.mark.parametrize("make_cache", [
    lambda model: StaticCache(config=model.config, max_cache_len=PROMPT_LENGTH + NEW_TOKENS),
    lambda model: DynamicCache(config=model.config),
], ids=["static", "dynamic"])
def test_transformers_cache_classes_pass_on_llama(make_cache):
    ids, mask = prompt_batch()
    report = verify_decode_loop(build_zoo_model("llama"), greedy_loop(make_cache), ids, NEW_TOKENS, attention_mask=mask)
    assert report.passed, report.rows[0].note


@pytest.mark.parametrize("make_cache", [
    lambda model: StaticCache(config=model.config, max_cache_len=PROMPT_LENGTH + NEW_TOKENS),
    lambda model: DynamicCache(config=model.config),
], ids=["static", "dynamic"])
def test_sliding_window_caches_pass_on_mistral_past_its_window(make_cache):
    """Both cache classes build sliding-window layers from the config (8 < prompt + new tokens)."""
    model = build_zoo_model("mistral", sliding_window=8)
    ids, mask = prompt_batch()
    assert "Sliding" in type(make_cache(model).layers[0]).__name__
    report = verify_decode_loop(model, greedy_loop(make_cache), ids, NEW_TOKENS, attention_mask=mask)
    assert report.passed, report.rows[0].note


@pytest.mark.skipif(not torch.cuda.is_available(), reason="transformers offloads the cache to CPU from a GPU")
def test_offloaded_cache_passes_on_llama():
    model = build_zoo_model("llama").cuda()
    ids, mask = prompt_batch()
    make_cache = lambda m: DynamicCache(config=m.config, offloading=True)  # noqa: E731
    report = verify_decode_loop(model, greedy_loop(make_cache), ids.cuda(), NEW_TOKENS, attention_mask=mask.cuda())
    assert report.passed, report.rows[0].note


@pytest.mark.parametrize("wrap", [False, True], ids=["plain", "hooked"])
def test_a_loop_around_generate_is_aligned(wrap):
    """`generate` keeps only the last position's logits at prefill: each forward's logits sit at its last slots."""
    model = build_zoo_model("llama")
    model = ic.load(model) if wrap else model
    ids, mask = prompt_batch()
    report = verify_decode_loop(model, generate_loop, ids, NEW_TOKENS, attention_mask=mask)
    assert report.passed, report.rows[0].note


# -- injected bugs are caught and localized --------------------------------------------------------------
def test_positions_restarting_are_localized_with_what_the_loop_passed():
    ids, mask = prompt_batch()
    loop = greedy_loop(next_positions=lambda last, step: torch.full_like(last, step))
    found = departure(verify_decode_loop(build_zoo_model("llama"), loop, ids, NEW_TOKENS, attention_mask=mask))
    assert (found.step, found.layer, found.hook) == (1, 0, "model.layers.0.self_attn")
    assert found.loop_inputs["position_ids"] == [0]
    assert found.loop_inputs["expected_position_ids"] == [PROMPT_LENGTH - 3 * found.row]
    assert found.loop_inputs["cache_length"] == found.loop_inputs["expected_cache_length"] == PROMPT_LENGTH


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_positions_off_by_one_are_caught_in_every_dtype(dtype):
    """From the second decode step on, positions run one ahead: invisible inside bfloat16's tolerance on the
    logits, caught exactly on the integers."""
    ids, mask = prompt_batch()
    loop = greedy_loop(next_positions=lambda last, step: last + (2 if step == 1 else 1))
    model = build_zoo_model("llama", dtype=dtype)
    report = verify_decode_loop(model, loop, ids, NEW_TOKENS, attention_mask=mask)
    found = departure(report)
    assert found.step == 2
    assert found.loop_inputs["position_ids"][0] == found.loop_inputs["expected_position_ids"][0] + 1
    if dtype == torch.float32:
        assert (found.layer, found.hook) == (0, "model.layers.0.self_attn")


def test_a_cache_that_drops_its_last_entry_is_localized():
    class DroppingCache(DynamicCache):
        """Loses the last prompt entry when decoding starts."""

        def update(self, keys, values, layer_idx, *args, **kwargs):
            layer = self.layers[layer_idx] if layer_idx < len(self.layers) else None
            if keys.shape[-2] == 1 and layer is not None and layer.keys.shape[-2] == PROMPT_LENGTH:
                layer.keys, layer.values = layer.keys[..., :-1, :], layer.values[..., :-1, :]
            return super().update(keys, values, layer_idx, *args, **kwargs)

    ids, _ = prompt_batch(batch=1)
    loop = greedy_loop(lambda model: DroppingCache(config=model.config), pass_mask=False)  # batch 1: no mask
    found = departure(verify_decode_loop(build_zoo_model("llama"), loop, ids, NEW_TOKENS))
    assert (found.step, found.layer) == (1, 0)
    # the cache reported the right length before the step; the entry went missing inside it
    assert found.loop_inputs["cache_length"] == found.loop_inputs["expected_cache_length"] == PROMPT_LENGTH


def test_a_mask_of_the_wrong_length_is_localized():
    ids, mask = prompt_batch()
    loop = greedy_loop(extend_mask_from_step=1)  # forgets to extend the mask on the first decode step
    found = departure(verify_decode_loop(build_zoo_model("llama"), loop, ids, NEW_TOKENS, attention_mask=mask))
    assert (found.step, found.layer) == (1, 0)
    given = found.loop_inputs
    assert (given["mask_length"], given["expected_mask_length"]) == (PROMPT_LENGTH, PROMPT_LENGTH + 1)


def test_a_cache_subclass_that_reorders_heads_is_localized_to_its_layer():
    class HeadSwappingCache(DynamicCache):
        """Stores layer 1's KV heads in reverse order after each write: later reads see them swapped."""

        def update(self, keys, values, layer_idx, *args, **kwargs):
            returned = super().update(keys, values, layer_idx, *args, **kwargs)
            if layer_idx == 1:
                self.layers[1].keys = self.layers[1].keys.flip(1)
            return returned

    ids, mask = prompt_batch()
    loop = greedy_loop(lambda model: HeadSwappingCache(config=model.config))
    model = build_zoo_model("llama", layers=3)
    found = departure(verify_decode_loop(model, loop, ids, NEW_TOKENS, attention_mask=mask))
    assert (found.step, found.layer, found.hook) == (1, 1, "model.layers.1.self_attn")


def test_a_patched_attention_forward_that_ignores_the_cache_is_localized(monkeypatch):
    model = build_zoo_model("llama", layers=4)
    attention = model.model.layers[2].self_attn
    original = attention.forward

    def forward_without_cache(hidden_states, *args, attention_mask=None, past_key_values=None, **kwargs):
        if attention_mask is not None:  # attend to the new tokens alone
            attention_mask = attention_mask[..., -hidden_states.shape[1]:]
        return original(hidden_states, *args, attention_mask=attention_mask, past_key_values=None, **kwargs)

    monkeypatch.setattr(attention, "forward", forward_without_cache)
    ids, mask = prompt_batch()
    found = departure(verify_decode_loop(model, greedy_loop(), ids, NEW_TOKENS, attention_mask=mask))
    assert (found.step, found.layer, found.hook) == (1, 2, "model.layers.2.self_attn")


# -- the probe -------------------------------------------------------------------------------------------
def test_probe_hooks_are_removed_also_when_the_loop_raises():
    model = build_zoo_model("llama")
    ids, mask = prompt_batch()

    def failing_loop(model, input_ids, attention_mask, max_new_tokens):
        model(input_ids, attention_mask=attention_mask)
        raise RuntimeError("the user's loop broke")

    with pytest.raises(RuntimeError, match="the user's loop broke"):
        verify_decode_loop(model, failing_loop, ids, NEW_TOKENS, attention_mask=mask)
    assert all(not module._forward_hooks and not module._forward_pre_hooks for module in model.modules())


def test_probe_finds_every_decoder_layer_and_its_attention():
    for family in ("llama", "gpt2", "bloom", "falcon", "gpt_neox", "opt", "mpt", "gptj", "phi"):
        probe = ModuleProbe(build_zoo_model(family))
        assert len(probe.layers) == len(probe.attentions) == build_zoo_model(family).config.num_hidden_layers, family


def test_plain_model_refusals():
    model = build_zoo_model("llama")
    with pytest.raises(ValueError, match="pass input_ids"):
        verify_decode_loop(model, greedy_loop(), "text needs a tokenizer")
    with pytest.raises(TypeError, match="HookedModel or a transformers PreTrainedModel"):
        verify_decode_loop(object(), greedy_loop())
    ids, mask = prompt_batch()
    with pytest.raises(ValueError, match=r"training mode.*model.eval\(\)"):
        verify_decode_loop(build_zoo_model("llama").train(), greedy_loop(), ids, NEW_TOKENS, attention_mask=mask)

    def refeeding_loop(model, input_ids, attention_mask, max_new_tokens):
        model(input_ids[:, 1:], attention_mask=attention_mask[:, 1:])

    with pytest.raises(ValueError, match="feeds each slot once"):
        verify_decode_loop(model, refeeding_loop, ids, NEW_TOKENS, attention_mask=mask)

    def uncached_loop(model, input_ids, attention_mask, max_new_tokens):  # the whole sequence every step
        for _ in range(max_new_tokens):
            token = model(input_ids, attention_mask=attention_mask).logits[:, -1:].argmax(-1)
            input_ids = torch.cat([input_ids, token], dim=1)
            attention_mask = torch.cat([attention_mask, torch.ones_like(token)], dim=1)

    with pytest.raises(ValueError, match="feeds each slot once"):
        verify_decode_loop(model, uncached_loop, ids, NEW_TOKENS, attention_mask=mask)


def test_readme_example_a_cache_reporting_pages_on_the_plain_trained_needle():
    """The README's example verbatim (seed 000's bug) on zoo:needle's checkpoint loaded by transformers."""
    from transformers import AutoModelForCausalLM

    from interp_cache.models.trained import trained_models
    from interp_cache.tasks.passkey import passkey_prompt

    class MyPagedCache(DynamicCache):
        def get_seq_length(self, layer_idx=0):
            return -(-super().get_seq_length(layer_idx) // 16)

    def my_loop(model, input_ids, attention_mask, max_new_tokens):
        cache = MyPagedCache(config=model.config)
        out = model(input_ids, past_key_values=cache, use_cache=True)
        for _ in range(max_new_tokens - 1):
            out = model(out.logits[:, -1:].argmax(-1), past_key_values=cache, use_cache=True)

    plain = AutoModelForCausalLM.from_pretrained(trained_models()["needle"]).eval()
    input_ids = torch.tensor([list(passkey_prompt(512, 0.5, "71432").text.encode())])
    report = verify_decode_loop(plain, my_loop, input_ids, max_new_tokens=4)
    found = departure(report)
    assert (found.step, found.layer, found.position) == (1, 0, 512)
    assert "position ids used [32] (true [512]), its cache reported length 32 (true 512)" in report.rows[0].note


def test_cli_checks_transformers_cache_classes_and_names_their_findings(capsys):
    from interp_cache.cli import main

    assert main(["verify", "--model", "zoo:llama", "--cache", "static", "--cache", "dynamic"]) == 0
    assert capsys.readouterr().out.count("PASS") == 4  # 2 caches x eager, sdpa
    # transformers 5.23 (pinned): Bloom's ALiBi is sized by the mask, StaticCache hands back max_cache_len keys
    assert main(["verify", "--model", "zoo:bloom", "--cache", "static", "--attn", "eager"]) == 1
    assert "UPSTREAM" in capsys.readouterr().out
    assert main(["verify", "--model", "zoo:llama", "--attn", "eager"]) == 2
    assert "add --cache" in capsys.readouterr().err
