"""One prefill compressed under many policies (`compress_prefilled`) == a prefill run under each policy:
the same logits at every decode step, the same entries and bytes, bit for bit -- every policy, families
with rotary, ALiBi, sliding windows and softcapping, left padding."""

from __future__ import annotations

import pytest
import torch

from conftest import hooked, padded_batch
from interp_cache.compress import SnapKV
from interp_cache.decoding import PrefillObservations, Stepper, compress_prefilled
from test_compress import LONG_PROMPTS, small_policies

STEPS = 5


def greedy(stepper: Stepper, logits: torch.Tensor) -> list[torch.Tensor]:
    seen = [logits]
    for _ in range(STEPS):
        seen.append(stepper.step(seen[-1].argmax(-1)))
    return seen


@pytest.mark.parametrize("family", ["llama", "bloom", "gemma2", "mistral", "gpt2"])
def test_every_policy_replayed_on_one_prefill_equals_its_own_prefill_bitwise(family):
    model = hooked(family)
    ids, mask = padded_batch(model, LONG_PROMPTS)
    observations = PrefillObservations()
    prefilled = Stepper(model, compress=observations)
    prefill_logits = prefilled.prefill(ids, mask)[:, -1]
    for policy in small_policies():
        direct = Stepper(model, compress=policy)
        direct_logits = greedy(direct, direct.prefill(ids, mask)[:, -1])
        branch = compress_prefilled(model, prefilled, observations, policy)
        replay_logits = greedy(branch, prefill_logits)
        name = type(policy).__name__
        for step, (a, b) in enumerate(zip(direct_logits, replay_logits)):
            assert torch.equal(a, b), f"{family} {name}: step {step} differs"
        for layer in range(model.num_layers):
            assert torch.equal(direct.cache.kept_positions(layer), branch.cache.kept_positions(layer)), (name, layer)
        assert direct.cache.nbytes == branch.cache.nbytes, name
    # The prefilled stepper itself decodes on as the full cache.
    full = Stepper(model)
    assert torch.equal(full.prefill(ids, mask)[:, -1], prefill_logits)


def test_replay_fires_the_decision_hooks_and_refuses_a_stepper_past_its_prefill_llama():
    model = hooked("llama")
    ids, mask = padded_batch(model, LONG_PROMPTS)
    observations = PrefillObservations()
    prefilled = Stepper(model, compress=observations)
    logits = prefilled.prefill(ids, mask)[:, -1]
    seen = []
    with model.hooks(fwd_hooks=[("blocks.1.cache.hook_keep", lambda keep, hook: seen.append(keep.shape))]):
        compress_prefilled(model, prefilled, observations, SnapKV(budget=8, window=2, kernel=3))
    assert seen == [(2, model.runners[1].spec.num_kv_heads, 8)]
    prefilled.step(logits.argmax(-1))
    with pytest.raises(ValueError, match="right after its prefill"):
        compress_prefilled(model, prefilled, observations, SnapKV(budget=8, window=2, kernel=3))
    with pytest.raises(ValueError, match="right after its prefill"):
        compress_prefilled(model, Stepper(model), observations, SnapKV(budget=8, window=2, kernel=3))
