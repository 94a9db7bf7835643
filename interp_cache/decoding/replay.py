"""One prefill, many policies: compress a prefilled cache as the prefill would have under each policy.

A policy decides what a layer keeps from that layer's queries and entries of the forward (its
`Observation`), and decisions take effect only when the forward completes -- so the prefill itself (its
logits, every layer's queries, keys and values) does not depend on the policy. A budget sweep therefore
needs one prefill, not one per policy and budget:

    observations = PrefillObservations()
    prefilled = Stepper(model, compress=observations)
    logits = prefilled.prefill(ids)
    for policy in [SnapKV(budget=64), H2O(heavy=32, recent=32), ...]:
        branch = compress_prefilled(model, prefilled, observations, policy)
        branch.step(logits[:, -1].argmax(-1))            # decodes under `policy` from here on

`compress_prefilled` writes the prefill's entries into a new cache under `policy` and runs, layer by
layer, the same decision the prefill forward would have run (`HookedCacheLayer.after_attention`:
`hook_scores` and `hook_keep` fire, now), then completes the forward: the cache holds the same entries,
positions, running scores and policy state, bit for bit, as a prefill run under `policy` (tested for every
policy). Call it before the prefilled stepper decodes on: the observations are views of its storage.
"""

from __future__ import annotations

from interp_cache.cache.policy_interface import Observation
from interp_cache.compress.base import CompressionPolicy
from interp_cache.core.attention import CacheRead


class PrefillObservations(CompressionPolicy):
    """Attached to a prefill in place of a policy: keeps every entry, records each layer's `Observation` of
    the last multi-token forward (queries, entries, context, attention spec)."""

    def __init__(self):
        self.by_layer: dict[int, Observation] = {}

    def propose_eviction(self, obs: Observation) -> None:
        if obs.context.num_new > 1:
            self.by_layer[obs.layer_idx] = obs
        return None


def compress_prefilled(model, prefilled, observations: PrefillObservations, policy):
    """A new `Stepper` over a cache holding what `prefilled` (a Stepper after its one prefill, watched by
    `observations`) would hold had the prefill run under `policy`."""
    source = prefilled.cache
    if source.forward_count != 1 or source.policy is not observations:
        raise ValueError(
            "compress_prefilled needs a Stepper right after its prefill (one forward) on a cache watched by these "
            f"observations (Stepper(model, compress=observations)); got {source.forward_count} forwards"
            + ("" if source.policy is observations else " on a cache with another policy")
        )
    missing = [i for i in range(len(source.layers)) if i not in observations.by_layer]
    if missing:
        raise ValueError(f"no observation of layers {missing}: the prefill must have fed more than one token")
    cache = model.new_cache(compress=policy)
    context = observations.by_layer[0].context
    for layer_idx, (stored, target) in enumerate(zip(source.layers, cache.layers)):
        keys, values, positions = stored.read()
        target.store(keys, values, positions, stored.logical_length, stored.storage.has_padding)
        # What the prefill's attention read: every entry written, in a cache nothing had compressed before.
        read = CacheRead(*target.read(), heads_share_positions=True, has_invisible_slots=stored.storage.has_padding)
        obs = observations.by_layer[layer_idx]
        target.after_attention(obs.query_bhpd, read, obs.spec, context, model.blocks[layer_idx].cache)
    cache.end_forward(context)
    return prefilled.continued_on(cache)
