"""The attention each cache entry received, as compression policies score it (H2O, SnapKV), against the
pattern the core itself forms (recorded `hook_pattern`), in every family: GQA, ALiBi, sliding windows,
softcapping, left padding, a prefill in two chunks (entries from an earlier forward) and query blocks
that do not divide the prompt, and single-query decode steps after it."""

from __future__ import annotations

import torch

from conftest import hooked, padded_batch
from interp_cache.cache import policy_interface
from interp_cache.compress import H2O
from interp_cache.compress.base import EvictionPolicy
from interp_cache.decoding import Stepper

LONG = "Some tokens before the question, long enough to span several query blocks of the scorer. " * 2
PROMPTS_ACROSS_BLOCKS = [LONG, LONG[:70]]
LAST_QUERIES = 5
DECODE_STEPS = 2


class ReceivedAttentionSpy(EvictionPolicy):
    """Evicts nothing; records what `attention_received` gives at every forward of every layer."""

    evicts_during_decoding = True

    def __init__(self):
        self.seen: dict[tuple[int, int], tuple[torch.Tensor, torch.Tensor]] = {}
        self.forward = 0

    def propose_eviction(self, obs):
        self.seen[(self.forward, obs.layer_idx)] = (
            obs.attention_received(), obs.attention_received(last_queries=LAST_QUERIES)
        )
        self.forward += obs.layer_idx == obs.num_layers - 1
        return None


def test_received_attention_equals_column_sums_of_the_recorded_pattern(family):
    model = hooked(family)
    ids, mask = padded_batch(model, PROMPTS_ACROSS_BLOCKS)
    assert ids.shape[1] > 150
    split = 97
    spy = ReceivedAttentionSpy()
    stepper = Stepper(model, compress=spy)
    with model.record(lambda name: name.endswith("hook_pattern")) as rec:
        stepper.prefill(ids[:, :split], mask[:, :split])
        logits = stepper.prefill(ids[:, split:], mask[:, split:])[:, -1]
        for _ in range(DECODE_STEPS):
            logits = stepper.step(logits.argmax(-1))
    spec = model.runners[0].spec
    group = spec.num_heads // spec.num_kv_heads
    decode_query = torch.ones_like(mask[:, :1])
    real_queries = [mask[:, :split], mask[:, split:]] + [decode_query] * DECODE_STEPS
    for forward, real in enumerate(real_queries):
        for layer in range(model.num_layers):
            pattern = rec[f"blocks.{layer}.attn.hook_pattern"][forward].activation.float()  # [b, h, p, k]
            b, h, p, k = pattern.shape
            weighted = pattern * real[:, None, :, None]
            expected_all = weighted.sum(2).view(b, spec.num_kv_heads, group, k).mean(2)
            expected_last = weighted[:, :, max(0, p - LAST_QUERIES) :].sum(2).view(b, spec.num_kv_heads, group, k).mean(2)
            received_all, received_last = spy.seen[(forward, layer)]
            assert received_all.shape == (b, spec.num_kv_heads, k)
            assert (received_all - expected_all).abs().max().item() <= 2e-5, (family, forward, layer)
            assert (received_last - expected_last).abs().max().item() <= 2e-5, (family, forward, layer)


def _h2o_run(model, ids, mask, policy, steps):
    stepper = Stepper(model, compress=policy)
    logits = [stepper.prefill(ids, mask)[:, -1]]
    kept = [[stepper.cache.kept_positions(layer) for layer in range(model.num_layers)]]
    for _ in range(steps):
        logits.append(stepper.step(logits[-1].argmax(-1)))
        kept.append([stepper.cache.kept_positions(layer) for layer in range(model.num_layers)])
    return logits, kept


def test_single_pass_h2o_forms_the_weights_once_and_keeps_what_two_passes_keep(family, monkeypatch):
    """H2O(single_pass_prefill=True) in every family: its prefill asks the scorer for nothing (attention handed
    the received attention over); every layer keeps the positions two passes keep, at the prefill and at
    every decode step; logits within 1e-5 of two passes (GPT-Neo's unscaled float32 scores: 2e-5)."""
    model = hooked(family)
    ids, mask = padded_batch(model, PROMPTS_ACROSS_BLOCKS)
    two_pass = H2O(heavy=24, recent=8)
    reference_logits, reference_kept = _h2o_run(model, ids, mask, two_pass, DECODE_STEPS)
    separate_calls = []
    original_scorer = policy_interface.received_attention
    monkeypatch.setattr(policy_interface, "received_attention",
                        lambda *args, **kwargs: separate_calls.append(1) or original_scorer(*args, **kwargs))
    single = H2O(heavy=24, recent=8, single_pass_prefill=True)
    logits, kept = _h2o_run(model, ids, mask, single, DECODE_STEPS)
    fusable = model.runners[0].spec.softcap is None  # a softcapped family forms its scores explicitly anyway
    assert len(separate_calls) == (0 if fusable else model.num_layers * (1 + DECODE_STEPS)), family
    bound = 2e-5 if family == "gpt_neo" else 1e-5
    for step, (a, b) in enumerate(zip(reference_logits, logits)):
        assert (a - b).abs().max().item() <= bound, (family, step)
    for step, (a, b) in enumerate(zip(reference_kept, kept)):
        for layer, (want, got) in enumerate(zip(a, b)):
            assert torch.equal(want, got), (family, step, layer)
