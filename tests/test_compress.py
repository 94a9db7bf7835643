"""KV-cache compression: identity at full budget, exact decoding after eviction, each policy's selection
against an independent reference, real memory savings, bad input (every family where it says so)."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from conftest import hooked, padded_batch
from interp_cache.cache import HookedCacheLayer
from interp_cache.compress import H2O, AdaKV, KNorm, PyramidKV, Quest, Random, SnapKV, StreamingLLM
from interp_cache.context import ForwardContext
from interp_cache.hook_points import CacheHooks
from interp_cache.stepper import Stepper

LONG_PROMPTS = ["The quick brown fox jumps over the lazy dog, again and again", "Hello there, friend"]
NEW_TOKENS = 6


def small_policies():
    """One instance of every policy with budgets well below the zoo prompts' lengths."""
    return [
        StreamingLLM(sink=2, window=8),
        H2O(heavy=6, recent=4),
        SnapKV(budget=14, window=4, kernel=3),
        PyramidKV(budget=14, window=4, kernel=3, beta=4),
        AdaKV(SnapKV(budget=14, window=4, kernel=3), alpha=0.2),
        Quest(budget=16, page_size=4, dense_layers=1),
        Random(budget=12, seed=3),
        KNorm(budget=12),
    ]


def full_budget_policies():
    """The same policies with budgets above any sequence the tests feed: they must change nothing."""
    return [
        StreamingLLM(sink=4, window=4096),
        H2O(heavy=4096, recent=16),
        SnapKV(budget=4096, window=4, kernel=3),
        PyramidKV(budget=4096, window=4, kernel=3),
        AdaKV(SnapKV(budget=4096, window=4, kernel=3)),
        Quest(budget=4096, page_size=4, dense_layers=1),
        Random(budget=4096),
        KNorm(budget=1.0),
    ]


def greedy_logits(model, ids, mask, compress=None, steps=NEW_TOKENS):
    stepper = Stepper(model, compress=compress)
    logits = [stepper.prefill(ids, mask)[:, -1]]
    for _ in range(steps):
        logits.append(stepper.step(logits[-1].argmax(-1)))
    return logits, stepper


def test_budget_at_or_above_length_is_bitwise_identity(family):
    model = hooked(family)
    ids, mask = padded_batch(model, LONG_PROMPTS)
    reference, _ = greedy_logits(model, ids, mask)
    for policy in full_budget_policies():
        logits, stepper = greedy_logits(model, ids, mask, compress=policy)
        for step, (a, b) in enumerate(zip(reference, logits)):
            assert torch.equal(a, b), f"{family} {type(policy).__name__}: step {step} differs"
        assert stepper.cache.physical_lengths == [ids.shape[1] + NEW_TOKENS] * model.num_layers


def _hide_entries_not_read(read_positions_by_layer):
    """Hooks for a dense run: per head, hide (position -1) every entry the compressed run did not read."""

    def hook_for(read_bgk):
        def hook(positions_bgk, hook):
            read = read_bgk.to(positions_bgk.device)
            in_read = (positions_bgk[..., :, None] == read[..., None, :]).any(-1) & (positions_bgk >= 0)
            return positions_bgk.masked_fill(~in_read, -1)

        return hook

    return [(f"blocks.{i}.cache.hook_positions", hook_for(read)) for i, read in read_positions_by_layer.items()]


@pytest.mark.parametrize("policy_index", range(8), ids=[type(p).__name__ for p in small_policies()])
def test_decoding_after_eviction_equals_dense_reference_reading_the_same_entries(family, policy_index):
    """Every decode step of a compressed run == a dense run whose attention sees only the entries the
    compressed run read (the rest hidden), with their true positions: float32, <= 1e-5."""
    model = hooked(family)
    policy = small_policies()[policy_index]
    if isinstance(policy, Quest) and model.num_layers <= policy.dense_layers:
        pytest.skip("model too shallow for Quest's dense layers")
    ids, mask = padded_batch(model, LONG_PROMPTS)
    compressed = Stepper(model, compress=policy)
    dense = Stepper(model)
    names = [f"blocks.{i}.cache.hook_positions" for i in range(model.num_layers)]
    token = None
    worst = 0.0
    for step in range(NEW_TOKENS + 1):
        with model.record(names) as rec:
            logits = compressed.prefill(ids, mask)[:, -1] if step == 0 else compressed.step(token)
        read = {i: rec[name][0].activation for i, name in enumerate(names)}
        hooks = [] if step == 0 else _hide_entries_not_read(read)
        with model.hooks(fwd_hooks=hooks):
            reference = dense.prefill(ids, mask)[:, -1] if step == 0 else dense.step(token)
        worst = max(worst, (logits - reference).abs().max().item())
        token = logits.argmax(-1)
    assert worst <= 1e-5, f"{family} {type(policy).__name__}: max abs logit diff {worst:.2e}"
    if not isinstance(policy, Quest):
        assert max(compressed.cache.physical_lengths) < ids.shape[1], "the policy evicted nothing"
