"""The attention each cache entry received, as compression policies score it (H2O, SnapKV), against the
pattern the core itself forms (recorded `hook_pattern`), in every family: GQA, ALiBi, sliding windows,
softcapping, left padding, a prefill in two chunks (entries from an earlier forward) and query blocks
that do not divide the prompt."""

from __future__ import annotations

import torch

from conftest import hooked, padded_batch
from interp_cache.compress.base import EvictionPolicy
from interp_cache.decoding import Stepper

LONG = "Some tokens before the question, long enough to span several query blocks of the scorer. " * 2
PROMPTS_ACROSS_BLOCKS = [LONG, LONG[:70]]
LAST_QUERIES = 5


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
        stepper.prefill(ids[:, split:], mask[:, split:])
    spec = model.runners[0].spec
    group = spec.num_heads // spec.num_kv_heads
    real_queries = [mask[:, :split], mask[:, split:]]
    for forward, real in enumerate(real_queries):
        for layer in range(model.num_layers):
            pattern = rec[f"blocks.{layer}.attn.hook_pattern"][forward].activation.float()  # [b, h, p, k]
            b, h, p, k = pattern.shape
            weighted = pattern * real[:, None, :, None]
            expected_all = weighted.sum(2).view(b, spec.num_kv_heads, group, k).mean(2)
            expected_last = weighted[:, :, p - LAST_QUERIES :].sum(2).view(b, spec.num_kv_heads, group, k).mean(2)
            received_all, received_last = spy.seen[(forward, layer)]
            assert received_all.shape == (b, spec.num_kv_heads, k)
            assert (received_all - expected_all).abs().max().item() <= 2e-5, (family, forward, layer)
            assert (received_last - expected_last).abs().max().item() <= 2e-5, (family, forward, layer)
