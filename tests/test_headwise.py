"""HeadWise (a policy per KV head): identity at full budget, full-cache heads attend as in a dense run,
bytes are the entries kept, each head keeps what its own policy alone would, bad input refused."""

from __future__ import annotations

import pytest
import torch

from conftest import hooked, padded_batch
from interp_cache.compress import H2O, AdaKV, HeadWise, Quest, SnapKV, StreamingLLM
from interp_cache.decoding import Stepper

PROMPTS = ["The quick brown fox jumps over the lazy dog, again and again", "Hello there, friend"]
STEPS = 5


def run(model, ids, mask, compress, record=()):
    """Greedy steps; per step the logits and the recorded activations of `record`."""
    stepper = Stepper(model, compress=compress)
    logits, seen = [], []
    token = None
    for step in range(STEPS + 1):
        with model.record(list(record)) as rec:
            out = stepper.prefill(ids, mask)[:, -1] if step == 0 else stepper.step(token)
        logits.append(out)
        seen.append({name: rec[name][0].activation for name in record})
        token = out.argmax(-1)
    return logits, seen, stepper


@pytest.mark.parametrize("family", ["llama", "bloom"])
def test_full_budget_for_every_head_is_bitwise_identity(family):
    model = hooked(family)
    ids, mask = padded_batch(model, PROMPTS)
    reference, _, _ = run(model, ids, mask, None)
    for policy in (HeadWise(), HeadWise({(0, 0): None}, default=StreamingLLM(4, 4096)),
                   HeadWise.covering(ids.shape[1] + STEPS)):
        logits, _, stepper = run(model, ids, mask, policy)
        assert all(torch.equal(a, b) for a, b in zip(reference, logits)), f"{family}: {policy}"
        assert stepper.cache.physical_lengths == [ids.shape[1] + STEPS] * model.num_layers


def by_position(seen, row, groups):
    """Attention of KV head 0's query heads (`[groups, queries]`) to each true key position of a batch row."""
    pattern = seen["blocks.0.attn.hook_pattern"][row, :groups]  # [groups, q, k]
    positions = seen["blocks.0.cache.hook_positions"][row, 0]  # [k]
    return {int(p): pattern[..., k] for k, p in enumerate(positions.tolist()) if p >= 0}


@pytest.mark.parametrize("family", ["llama", "bloom"])
def test_full_cache_heads_attend_exactly_as_in_a_dense_run(family):
    """Layer 0 sees the same tokens in both runs (teacher-forced), so a full-cache head's pattern over its
    entries equals the dense run's, and it keeps every position; the streaming heads keep sink + window."""
    model = hooked(family)
    ids, mask = padded_batch(model, PROMPTS)
    groups = model.blocks[0].attn.hook_z.layout.size("head") // model.blocks[0].cache.hook_k_write.layout.size("kv_head")
    policy = HeadWise({(0, 0): None, (1, 0): None}, default=StreamingLLM(sink=2, window=6))
    names = ["blocks.0.attn.hook_pattern", "blocks.0.cache.hook_positions"]
    dense_logits, dense_seen, _ = run(model, ids, mask, None, names)
    stepper = Stepper(model, compress=policy)
    worst = 0.0
    for step in range(STEPS + 1):
        with model.record(names) as rec:
            if step == 0:
                stepper.prefill(ids, mask)
            else:
                stepper.step(dense_logits[step - 1].argmax(-1))
        seen = {name: rec[name][0].activation for name in names}
        for row in range(ids.shape[0]):
            mine = by_position(seen, row, groups)
            reference = by_position(dense_seen[step], row, groups)
            assert mine.keys() == reference.keys()
            worst = max([worst] + [(mine[p] - reference[p]).abs().max().item() for p in mine])
    assert worst <= 1e-6, f"{family}: full-cache head pattern differs by {worst:.2e}"
    length = ids.shape[1] + STEPS
    counts = stepper.cache.kept_counts()  # [layers, b, g]
    real = mask.sum(-1) + STEPS
    for layer in (0, 1):
        assert counts[layer, :, 0].tolist() == real.tolist()  # every real entry, padding evicted
        positions = stepper.cache.kept_positions(layer)[:, 0]
        for row in range(ids.shape[0]):
            kept = positions[row][positions[row] >= 0].tolist()
            assert kept == list(range(int(real[row])))
    assert (counts[:, :, 1:] == 2 + 6).all() and length > 2 + 6  # the other heads: sink + window


def test_bytes_equal_the_sum_of_the_per_head_kept_entries_llama():
    model = hooked("llama")
    ids = torch.randint(0, 250, (1, 120))
    policy = HeadWise({(0, 1): None}, default=SnapKV(budget=16, window=4, kernel=3))
    stepper = Stepper(model, compress=policy)
    stepper.prefill(ids)
    cache = stepper.cache
    counts = cache.kept_counts()
    assert counts[0, 0].tolist() == [16, 120] and counts[1, 0].tolist() == [16, 16]
    keys, values, positions = cache.layers[0].read()
    per_entry = (keys.shape[-1] * keys.element_size() + values.shape[-1] * values.element_size()
                 + positions.element_size())
    expected = int(counts.sum()) * per_entry + cache.next_position.numel() * cache.next_position.element_size()
    bookkeeping = 8 * counts[0].numel()  # the compact layer's int64 count per head
    assert cache.nbytes == expected + bookkeeping, (cache.nbytes, expected)


def test_each_head_keeps_what_its_own_policy_alone_would_keep_qwen2():
    model = hooked("qwen2")
    ids, mask = padded_batch(model, PROMPTS)
    snap = SnapKV(budget=10, window=2, kernel=3)
    streaming = StreamingLLM(sink=2, window=6)
    alone = {}
    for name, policy in (("snap", snap), ("streaming", streaming)):
        stepper = Stepper(model, compress=policy)
        stepper.prefill(ids, mask)
        alone[name] = [stepper.cache.kept_positions(i) for i in range(model.num_layers)]
    mixed = Stepper(model, compress=HeadWise({(1, 0): snap}, default=streaming))
    mixed.prefill(ids, mask)
    for layer in range(model.num_layers):
        kept = mixed.cache.kept_positions(layer)
        for head in range(kept.shape[1]):
            source = alone["snap" if (layer, head) == (1, 0) else "streaming"][layer][:, head]
            mine = kept[:, head]
            for row in range(kept.shape[0]):
                assert sorted(p for p in mine[row].tolist() if p >= 0) == sorted(p for p in source[row].tolist() if p >= 0)


@pytest.mark.parametrize("make, message", [
    (lambda: HeadWise({(0, 0): H2O()}), r"heads\[\(0, 0\)\] must be None .* or one of"),
    (lambda: HeadWise(default=AdaKV()), "default must be None"),
    (lambda: HeadWise(default=Quest()), "default must be None"),
    (lambda: HeadWise({0: None}), r"keyed by \(layer, kv_head\)"),
    (lambda: HeadWise({(0, -1): None}), r"keyed by \(layer, kv_head\)"),
    (lambda: HeadWise("0.0=full"), "must be a dict"),
])
def test_bad_compositions_are_refused(make, message):
    with pytest.raises(ValueError, match=message):
        make()


def test_heads_outside_the_model_are_refused_llama():
    model = hooked("llama")
    with pytest.raises(ValueError, match=r"head \(5, 0\): the model has layers 0..1"):
        model.new_cache(compress=HeadWise({(5, 0): None}))
    with pytest.raises(ValueError, match=r"head \(0, 9\): layer 0 has KV heads 0..1"):
        model.new_cache(compress=HeadWise({(0, 9): None}))
