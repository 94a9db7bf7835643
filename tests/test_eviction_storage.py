"""What eviction does to storage: the bytes sized at the prefill are released, a policy that evicts while
decoding never holds storage beyond the entries it keeps plus its headroom, and a slack evicts in blocks -- counted in entries and bytes."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from conftest import hooked
from interp_cache.cache.storage import CAPACITY_GRANULARITY, grown_capacity
from interp_cache.compress import H2O, AdaKV, HeadWise, KNorm, PyramidKV, Random, SnapKV, StreamingLLM
from interp_cache.decoding import Stepper

PROMPT_TOKENS = 160
BUDGET = 24

EVICTING = [
    StreamingLLM(sink=4, window=BUDGET - 4),
    StreamingLLM(sink=4, window=BUDGET - 4, slack=8),
    H2O(heavy=BUDGET // 2, recent=BUDGET // 2),
    H2O(heavy=BUDGET // 2, recent=BUDGET // 2, slack=8),
    SnapKV(budget=BUDGET, window=4, kernel=3),
    PyramidKV(budget=BUDGET, window=4, kernel=3),
    AdaKV(SnapKV(budget=BUDGET, window=4, kernel=3)),
    KNorm(budget=BUDGET),
    Random(budget=BUDGET, seed=1),
    HeadWise({(0, 0): None}, default=StreamingLLM(sink=4, window=BUDGET - 4, slack=8)),
]


def prompt(batch: int = 1) -> torch.Tensor:
    return torch.randint(3, 250, (batch, PROMPT_TOKENS), generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("policy", EVICTING, ids=repr)
def test_after_prefill_eviction_capacity_is_at_most_kept_plus_one_growth_step_llama(policy):
    model = hooked("llama")
    stepper = Stepper(model, compress=policy)
    stepper.prefill(prompt(2))
    headroom = policy.storage_headroom() or 0
    for layer in stepper.cache.layers:
        storage = layer.storage
        assert int(layer.slot_counts().min()) < PROMPT_TOKENS  # something was evicted
        assert storage.capacity <= grown_capacity(storage.physical_length + headroom), storage.capacity


@pytest.mark.parametrize("policy", [p for p in EVICTING if p.evicts_during_decoding], ids=repr)
def test_decoding_policy_holds_at_most_budget_plus_slack_in_storage_of_kept_plus_headroom_llama(policy):
    model = hooked("llama")
    stepper = Stepper(model, compress=policy)
    logits = stepper.prefill(prompt())[:, -1]
    slack, headroom = policy.eviction_slack(), policy.storage_headroom()
    held = []
    for _ in range(3 * (slack + 1)):
        logits = stepper.step(logits.argmax(-1))
        held.append(int(stepper.cache.kept_counts().max()))
        for layer in stepper.cache.layers:  # no growth step: an eviction leaves room for exactly the headroom
            assert layer.storage.capacity <= layer.storage.physical_length + headroom, layer.layer_idx
            if not isinstance(policy, HeadWise):
                assert layer.storage.capacity <= BUDGET + headroom, layer.layer_idx
    if isinstance(policy, HeadWise):  # head (0, 0) keeps everything; the others follow the default
        held = [int(stepper.cache.layers[1].kept_counts().max())]
    assert max(held) <= BUDGET + slack
    if slack and not isinstance(policy, HeadWise):
        # Blocks: BUDGET + 1, ..., BUDGET + slack, then back to BUDGET on the step that would exceed it.
        assert held[: slack + 1] == [BUDGET + i for i in range(1, slack + 1)] + [BUDGET]


def test_streaming_llm_bytes_follow_the_entries_kept_at_every_step_llama():
    """nbytes <= the bytes of (entries held + the headroom) entries, after the prefill and at every decode step:
    nothing sized at the prefill is left behind."""
    model = hooked("llama")
    policy = StreamingLLM(sink=4, window=BUDGET - 4, slack=8)
    compressed, full = Stepper(model, compress=policy), Stepper(model)
    token = compressed.prefill(prompt())[:, -1].argmax(-1)
    full.prefill(prompt())
    headroom = policy.storage_headroom()
    full_layer = full.cache.layers[0].storage
    bytes_per_entry = full_layer.nbytes // full_layer.capacity  # keys, values, position of one slot, all heads
    for step in range(20):
        held = int(compressed.cache.kept_counts().max())
        layer_bytes = sum(layer.nbytes for layer in compressed.cache.layers)
        assert layer_bytes <= model.num_layers * (held + headroom) * bytes_per_entry, (step, held)
        token = compressed.step(token).argmax(-1)
        full.step(token)


@given(capacity=st.integers(0, 1 << 22))
def test_one_growth_step_adds_at_least_one_entry_and_less_than_16_plus_a_32nd(capacity):
    grown = grown_capacity(capacity)
    assert grown % CAPACITY_GRANULARITY == 0
    assert capacity < grown < capacity + CAPACITY_GRANULARITY + max(1, capacity // 32)


def test_pyramidkv_top_layers_keep_under_16_spare_entries_while_decoding_llama():
    """PyramidKV's top layer keeps a few entries; the first decode step grows its storage by under 16 entries
    (rounding `capacity + 16` up to 16 had given a 2-entry head 30 spare slots)."""
    model = hooked("llama")
    stepper = Stepper(model, compress=PyramidKV(budget=8, window=2, kernel=3))
    logits = stepper.prefill(prompt())[:, -1]
    for _ in range(4):
        logits = stepper.step(logits.argmax(-1))
        for layer in stepper.cache.layers:
            spare = layer.storage.capacity - layer.storage.physical_length
            assert 0 <= spare < CAPACITY_GRANULARITY, (layer.layer_idx, layer.storage.capacity)
