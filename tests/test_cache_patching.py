"""Cache patching between steps: read, replace and delete entries by absolute position, layer, head, row;
fork for several continuations from one prefix (llama with GQA, bloom with ALiBi, gpt2, mistral)."""

from __future__ import annotations

import pytest
import torch

from conftest import hooked, padded_batch
from interp_cache.compress import SnapKV
from interp_cache.decoding import Stepper

PROMPTS = ["The quick brown fox jumps over", "A slow green turtle walks by the"]


def prefilled(model, prompts=PROMPTS, compress=None):
    ids, mask = padded_batch(model, prompts)
    stepper = Stepper(model, compress=compress)
    logits = stepper.prefill(ids, mask)[:, -1]
    return stepper, logits.argmax(-1), ids, mask


@pytest.mark.parametrize("family", ["llama", "bloom", "gpt2"])
def test_deleting_entries_equals_hiding_them_from_attention(family):
    model = hooked(family)
    patched, token, ids, mask = prefilled(model)
    dense, _, _, _ = prefilled(model)
    deleted = {3, 5, 8}
    for layer in range(model.num_layers):
        assert patched.cache.delete_entries(layer, positions=deleted, heads=[0]) == len(deleted) * ids.shape[0]

    def hide(positions_bgk, hook):
        hidden = torch.isin(positions_bgk, torch.tensor(sorted(deleted)))
        hidden[:, 1:] = False  # KV head 0 only
        return positions_bgk.masked_fill(hidden, -1)

    hooks = [(f"blocks.{i}.cache.hook_positions", hide) for i in range(model.num_layers)]
    with model.hooks(fwd_hooks=hooks):
        reference = dense.step(token)
    assert (patched.step(token) - reference).abs().max().item() <= 1e-5
    assert not (set(patched.cache.kept_positions(0)[0, 0].tolist()) & deleted)
    if patched.cache.kept_positions(0).shape[1] > 1:
        assert deleted <= set(patched.cache.kept_positions(0)[0, 1].tolist())


@pytest.mark.parametrize("family", ["llama", "bloom"])
def test_replacing_every_entry_with_another_prompts_reproduces_that_prompts_next_step(family):
    """Two prompts of equal length: copying B's keys/values into A's cache makes A's next step B's."""
    model = hooked(family)
    a, token, ids_a, _ = prefilled(model, ["The quick brown fox jumps"])
    b, _, ids_b, _ = prefilled(model, ["A slow green turtle walks"])
    assert ids_a.shape == ids_b.shape
    for layer in range(model.num_layers):
        keys, values, _ = b.cache.read_entries(layer)
        a.cache.replace_entries(layer, keys=keys, values=values)
    assert torch.equal(a.step(token), b.step(token))


def test_replacing_one_head_at_one_position_changes_only_that_entry_mistral():
    model = hooked("mistral")
    stepper, token, _, mask = prefilled(model)
    before = stepper.cache.read_entries(1)
    vector = torch.full((before[0].shape[-1],), 3.0)
    position = int(mask[0].sum()) - 2  # inside the sliding window of the next step
    changed = stepper.cache.replace_entries(1, positions=[position], keys=vector, heads=1, rows=[0])
    after = stepper.cache.read_entries(1)
    assert changed == 1
    where = (before[0] != after[0]).any(-1).nonzero().tolist()
    assert where == [[0, 1, int((before[2][0, 1] == position).nonzero())]]
    assert torch.equal(before[1], after[1]) and torch.equal(before[2], after[2])
    logits_changed = stepper.step(token)
    fresh, _, _, _ = prefilled(model)
    assert not torch.equal(logits_changed, fresh.step(token))


def test_cache_patching_works_on_a_head_wise_compressed_cache_llama():
    model = hooked("llama")
    stepper, token, _, _ = prefilled(model, compress=SnapKV(budget=10, window=2, kernel=3))
    stored = stepper.cache.kept_positions(0)[0, 0]
    target = int(stored[stored >= 0][0])
    assert stepper.cache.delete_entries(0, positions=[target], heads=[0], rows=[0]) == 1
    assert stepper.cache.layers[0].storage.prefix is not None  # heads now hold unequal counts, stored compactly
    counts = stepper.cache.kept_counts()[0]
    assert int(counts[0, 0]) == int(counts[0, 1]) - 1
    keys, values, positions = stepper.cache.read_entries(0)
    stepper.cache.replace_entries(0, keys=keys * 0.5, values=values)
    assert torch.equal(stepper.cache.read_entries(0)[0], keys * 0.5)
    assert torch.isfinite(stepper.step(token)).all()


def test_bad_cache_patches_say_what_is_accepted_gpt2():
    model = hooked("gpt2")
    stepper, _, _, _ = prefilled(model)
    with pytest.raises(ValueError, match="layer must be in"):
        stepper.cache.delete_entries(7, positions=[1])
    with pytest.raises(ValueError, match="heads must be in"):
        stepper.cache.delete_entries(0, positions=[1], heads=[9])
    with pytest.raises(ValueError, match="no stored entry"):
        stepper.cache.replace_entries(0, positions=[999], keys=torch.zeros(16))
    with pytest.raises(ValueError, match="keys must have shape"):
        stepper.cache.replace_entries(0, positions=[1], keys=torch.zeros(3))
    with pytest.raises(ValueError, match="holds no entries"):
        model.new_cache().delete_entries(0, positions=[0])


@pytest.mark.parametrize("family", ["llama", "bloom"])
def test_two_continuations_from_a_forked_cache_equal_two_independent_runs(family):
    model = hooked(family)
    stepper, _, ids, mask = prefilled(model)
    branch = stepper.fork()
    continuations = (torch.tensor([65, 66]), torch.tensor([70, 71]))
    forked = [s.step(t) for s, t in zip((stepper, branch), continuations)]
    for tokens, logits in zip(continuations, forked):
        independent = Stepper(model)
        independent.prefill(ids, mask)
        assert torch.equal(independent.step(tokens), logits)


def test_a_cache_filled_with_gradients_enabled_forks_and_stays_differentiable_gpt2():
    model = hooked("gpt2")
    ids, mask = padded_batch(model, PROMPTS)
    out = model(ids, attention_mask=mask, use_cache=True)  # no torch.no_grad(): entries carry autograd history
    branch = out.past_key_values.fork()
    keys = branch.layers[0].read()[0]
    assert keys.requires_grad and keys.data_ptr() != out.past_key_values.layers[0].read()[0].data_ptr()
    keys.sum().backward()
    assert next(model.hf_model.parameters()).grad is not None
    model.hf_model.zero_grad(set_to_none=True)


@pytest.mark.parametrize("name", ["hook_k_read", "hook_v_read", "hook_positions"])
def test_a_read_hook_editing_the_stored_entries_in_place_is_refused_llama(name):
    """A read of the uniform tail is a view of storage: an in-place edit would outlive this forward."""
    model = hooked("llama")
    stepper, token, _, _ = prefilled(model)

    def edit_in_place(read, hook):
        read.mul_(2)

    with model.hooks(fwd_hooks=[(f"blocks.0.cache.{name}", edit_in_place)]):
        with pytest.raises(ValueError, match=rf"blocks.0.cache.{name}: the hook edited the cache's stored entries "
                                             r"in place .* return an edited copy .* cache.replace_entries\(\)"):
            stepper.step(token)
    doubled = lambda read, hook: read * 2  # the same edit, returned: this forward only
    fresh, token, _, _ = prefilled(model)
    before = [tensor.clone() for tensor in fresh.cache.layers[0].read()]
    with model.hooks(fwd_hooks=[(f"blocks.0.cache.{name}", doubled)]):
        fresh.step(token)
    k = before[2].shape[-1]
    assert all(torch.equal(old, new[:, :, :k]) for old, new in zip(before, fresh.cache.layers[0].read()))
