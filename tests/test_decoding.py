"""Decoding strategies through transformers' loop over a HookedCache (zoo llama unless named)."""

from __future__ import annotations

import pytest
import torch

import interp_cache as ic
from conftest import hooked, original, padded_batch
from interp_cache.models.zoo import build_zoo_model


def _ref_generate(family, input_ids, attention_mask, **kwargs):
    model = hooked(family)
    with torch.no_grad():
        return original(family).generate(
            input_ids, attention_mask=attention_mask, pad_token_id=model.tokenizer.pad_token_id, **kwargs
        )


@pytest.mark.parametrize("family", ["llama", "gpt2", "bloom"])
def test_sampling_with_seed_matches_original(family):
    model = hooked(family)
    input_ids, attention_mask = padded_batch(model)
    kwargs = dict(max_new_tokens=12, do_sample=True, temperature=0.8, top_k=20, top_p=0.9, repetition_penalty=1.3,
                  num_return_sequences=2)
    torch.manual_seed(7)
    expected = _ref_generate(family, input_ids, attention_mask, **kwargs)
    torch.manual_seed(7)
    got = model.generate(input_ids, attention_mask=attention_mask, **kwargs)
    assert got.shape == (4, input_ids.shape[1] + 12)
    assert torch.equal(got, expected)


def test_beam_search_matches_original_llama():
    model = hooked("llama")
    input_ids, attention_mask = padded_batch(model)
    kwargs = dict(max_new_tokens=10, num_beams=4, num_return_sequences=2, do_sample=False)
    assert torch.equal(model.generate(input_ids, attention_mask=attention_mask, **kwargs),
                       _ref_generate("llama", input_ids, attention_mask, **kwargs))


def test_stop_string_ends_generation():
    model = hooked("llama")
    prompt = model.tokenizer(["Hello"], return_tensors="pt")["input_ids"]
    free = model.generate(prompt, max_new_tokens=20, do_sample=False)
    text = model.tokenizer.decode(free[0, prompt.shape[1]:])
    stop = text[3:5]  # a string the free run produces after its third new byte
    assert len(stop) == 2
    stopped = model.generate(prompt, max_new_tokens=20, do_sample=False, stop_strings=[stop])
    stopped_text = model.tokenizer.decode(stopped[0, prompt.shape[1]:])
    assert stopped_text.endswith(stop) and len(stopped_text) < len(text)


def test_eos_token_stops_and_pads():
    model = hooked("llama")
    prompt = model.tokenizer(["Hello"], return_tensors="pt")["input_ids"]
    free = model.generate(prompt, max_new_tokens=10, do_sample=False)
    eos = int(free[0, prompt.shape[1] + 2])  # declare the third generated token the end of sequence
    out = model.generate(prompt, max_new_tokens=10, do_sample=False, eos_token_id=eos)
    assert out.shape[1] == prompt.shape[1] + 3
    assert int(out[0, -1]) == eos


def test_max_new_tokens_zero_returns_prompt():
    model = hooked("llama")
    prompt = model.tokenizer(["Hello"], return_tensors="pt")["input_ids"]
    assert torch.equal(model.generate(prompt, max_new_tokens=0), prompt)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(max_new_tokens=-1), "max_new_tokens must be an integer >= 0"),
        (dict(max_new_tokens=4, do_sample=True, top_p=0.0), r"top_p must be in \(0, 1\]"),
        (dict(max_new_tokens=4, do_sample=True, top_p=1.5), r"top_p must be in \(0, 1\]"),
        (dict(max_new_tokens=4, do_sample=True, temperature=0.0), "temperature must be > 0"),
        (dict(max_new_tokens=4, num_beams=0), "num_beams must be an integer >= 1"),
    ],
)
def test_bad_generation_arguments_raise_with_accepted_range(kwargs, message):
    model = hooked("llama")
    prompt = model.tokenizer(["Hello"], return_tensors="pt")["input_ids"]
    with pytest.raises(ValueError, match=message):
        model.generate(prompt, **kwargs)


def test_empty_prompt_raises():
    model = hooked("llama")
    with pytest.raises(ValueError, match="empty prompt"):
        model.generate(torch.zeros(1, 0, dtype=torch.long), max_new_tokens=3)
    with pytest.raises(ValueError, match="empty input"):
        model(torch.zeros(1, 0, dtype=torch.long))


def test_a_checkpoint_folder_round_trips_with_its_byte_tokenizer_qwen2(tmp_path):
    model = hooked("qwen2")
    model.hf_model.save_pretrained(tmp_path)
    model.tokenizer.save_pretrained(tmp_path)
    loaded = ic.load(str(tmp_path))
    ids = model.tokenizer(["Hello there"], return_tensors="pt")["input_ids"]
    assert loaded.tokenizer("Hello there")["input_ids"] == ids[0].tolist()
    assert torch.equal(loaded(ids).logits, model(ids).logits)


def test_a_folder_without_tokenizer_fails_before_weights_load_naming_the_argument_llama(tmp_path, monkeypatch):
    hooked("llama").hf_model.save_pretrained(tmp_path)
    calls = []
    monkeypatch.setattr(ic.models.loading.AutoModelForCausalLM, "from_pretrained", lambda *a, **k: calls.append(a))
    with pytest.raises(ValueError, match="has no tokenizer files .*pass tokenizer= to load"):
        ic.load(tmp_path)
    assert calls == []  # refused before any weight was read


def test_load_options_go_to_from_pretrained_and_a_built_model_is_wrapped_gpt2(tmp_path):
    model = hooked("gpt2")
    model.hf_model.save_pretrained(tmp_path)
    model.tokenizer.save_pretrained(tmp_path)
    eager = ic.load(tmp_path, attn_implementation="eager")
    assert eager.hf_model.config._attn_implementation == "eager"
    built = ic.load(build_zoo_model("gpt2"), tokenizer=ic.ByteTokenizer())
    assert built.family == "gpt2" and built.tokenizer is not None
    with pytest.raises(ValueError, match="did you mean 'zoo:llama'"):
        ic.load("llama")
    with pytest.raises(TypeError, match="load takes 'zoo:<name>', a checkpoint folder"):
        ic.load(3)


def test_a_filled_cache_continues_as_in_transformers_or_says_what_to_pass_llama():
    model = hooked("llama")
    ids, mask = padded_batch(model)
    first = model.generate(ids, attention_mask=mask, max_new_tokens=3, do_sample=False, return_dict_in_generate=True)
    whole = first.sequences
    whole_mask = torch.cat([mask, torch.ones_like(whole[:, mask.shape[1]:])], dim=1)
    continued = model.generate(whole, attention_mask=whole_mask, max_new_tokens=3, do_sample=False,
                               past_key_values=first.past_key_values)
    assert torch.equal(continued, model.generate(ids, attention_mask=mask, max_new_tokens=6, do_sample=False))
    cache = first.past_key_values
    with pytest.raises(ValueError, match="filled with a batch of 2 rows; input_ids has 1"):
        model.generate(ids[:1], attention_mask=mask[:1], max_new_tokens=2, past_key_values=cache)
    with pytest.raises(ValueError, match=r"already holds \d+ token slots; as in transformers, a continuation passes"):
        model.generate(ids[:, -2:], max_new_tokens=2, past_key_values=cache)
    empty = model.generate(ids, attention_mask=mask, max_new_tokens=0, return_dict_in_generate=True)
    assert torch.equal(empty.sequences, ids)
