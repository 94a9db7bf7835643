"""HookedCache: amortised growth, true positions with left padding, bytes, fork and rewind (zoo llama)."""

from __future__ import annotations

import torch
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from conftest import hooked, padded_batch
from interp_cache.cache import LayerStorage
from interp_cache.decoding import Stepper


def test_growth_is_amortised_not_a_copy_per_step():
    layer = LayerStorage()
    reallocations, entries_copied = 0, 0
    storage = None
    steps = 2000
    for step in range(steps):
        k = torch.randn(1, 2, 1, 4)
        layer.append(k, k, torch.full((1, 2, 1), step))
        if layer.keys.data_ptr() != storage:
            reallocations += 1
            entries_copied += step  # a reallocation moves every entry already stored
            storage = layer.keys.data_ptr()
    assert layer.physical_length == steps
    # 16 entries more per growth up to 512, then 1/32 more: 32 + 36 reallocations, not one per step.
    assert reallocations == 68, reallocations
    assert entries_copied <= 32 * steps, entries_copied
    assert layer.capacity - steps <= max(16, steps // 32) + 16  # spare: one growth step at most
    assert torch.equal(layer.read()[2][0, 0], torch.arange(steps))


@settings(max_examples=25, deadline=None)
@given(chunks=st.lists(st.integers(min_value=1, max_value=5), min_size=1, max_size=8))
def test_any_chunking_stores_the_same_entries(chunks):
    full = LayerStorage()
    chunked = LayerStorage()
    total = sum(chunks)
    keys = torch.randn(2, 3, total, 4)
    positions = torch.arange(total).expand(2, 3, total)
    full.append(keys, keys * 2, positions)
    start = 0
    for n in chunks:
        chunked.append(keys[:, :, start:start + n], keys[:, :, start:start + n] * 2, positions[:, :, start:start + n])
        start += n
    for a, b in zip(full.read(), chunked.read()):
        assert torch.equal(a, b)


def test_positions_are_true_and_padding_is_marked():
    model = hooked("llama")
    input_ids, attention_mask = padded_batch(model)
    cache = model.new_cache()
    with torch.no_grad():
        model(input_ids, attention_mask=attention_mask, past_key_values=cache, use_cache=True)
        step_mask = torch.cat([attention_mask, torch.ones(2, 1, dtype=torch.long)], 1)
        model(torch.tensor([[65], [66]]), attention_mask=step_mask, past_key_values=cache, use_cache=True)
    positions = cache.kept_positions(0)  # [b, g, k]
    pads = int((attention_mask[1] == 0).sum())
    real_second = input_ids.shape[1] - pads
    assert positions.shape == (2, model.runners[0].spec.num_kv_heads, input_ids.shape[1] + 1)
    assert torch.equal(positions[0, 0], torch.arange(input_ids.shape[1] + 1))
    assert torch.equal(positions[1, 0, :pads], torch.full((pads,), -1))
    assert torch.equal(positions[1, 0, pads:], torch.arange(real_second + 1))
    assert cache.logical_length == input_ids.shape[1] + 1
    assert cache.forward_count == 2


def test_nbytes_counts_every_tensor():
    model = hooked("llama")
    input_ids, attention_mask = padded_batch(model)
    cache = model.new_cache()
    with torch.no_grad():
        model(input_ids, attention_mask=attention_mask, past_key_values=cache, use_cache=True)
    expected = 0
    for layer in cache.layers:
        for tensor in (layer.storage.keys, layer.storage.values, layer.storage.positions):
            expected += tensor.untyped_storage().nbytes()
    expected += cache.next_position.untyped_storage().nbytes()
    assert cache.nbytes == expected > 0


def test_uncached_forward_returns_no_cache_and_cached_returns_hooked_cache():
    model = hooked("llama")
    input_ids, attention_mask = padded_batch(model)
    with torch.no_grad():
        assert model(input_ids, attention_mask=attention_mask).past_key_values is None
        out = model(input_ids, attention_mask=attention_mask, use_cache=True)
    assert type(out.past_key_values).__name__ == "HookedCache"
    assert out.past_key_values.logical_length == input_ids.shape[1]


def test_seed_000_loop_without_mask_or_positions_is_correct():
    """The hand-written loop of seed 000 (no attention mask, no position ids) decodes correctly here."""
    model = hooked("llama")
    prompt = model.tokenizer(["The quick brown fox"], return_tensors="pt")["input_ids"]
    with torch.no_grad():
        out = model(prompt, use_cache=True)
        cache, tokens = out.past_key_values, [out.logits[:, -1].argmax(-1, keepdim=True)]
        for _ in range(7):
            out = model(tokens[-1], past_key_values=cache, use_cache=True)
            cache = out.past_key_values
            tokens.append(out.logits[:, -1].argmax(-1, keepdim=True))
    expected = model.generate(prompt, max_new_tokens=8, do_sample=False, eos_token_id=None)
    assert torch.equal(torch.cat(tokens, 1), expected[:, prompt.shape[1]:])


def test_kept_counts_count_real_entries_and_slot_counts_the_storage_gpt2():
    model = hooked("gpt2")
    ids, mask = padded_batch(model)
    stepper = Stepper(model)
    stepper.prefill(ids, mask)
    layer = stepper.cache.layers[0]
    real = mask.sum(-1)
    assert layer.kept_counts()[:, 0].tolist() == real.tolist()
    assert layer.slot_counts()[:, 0].tolist() == [ids.shape[1]] * ids.shape[0]
    assert stepper.cache.physical_lengths == [ids.shape[1]] * model.num_layers
    with pytest.raises(ValueError, match="holds no entries yet"):
        model.new_cache().layers[0].kept_counts()
