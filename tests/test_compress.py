"""KV-cache compression: identity at full budget, exact decoding after eviction, each policy's selection
against an independent reference, real memory savings, bad input (every family where it says so)."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from conftest import hide_entries_not_read, hooked, padded_batch, policy_with_budget
from interp_cache.cache import HookedCacheLayer
from interp_cache.compress import H2O, AdaKV, HeadWise, KNorm, PyramidKV, Quest, Random, SnapKV, StreamingLLM
from interp_cache.core.attention import AttentionSpec
from interp_cache.core.context import ForwardContext
from interp_cache.core.hook_points import CacheHooks
from interp_cache.compress import policy_classes
from interp_cache.compress.spec import parse_policy
from interp_cache.decoding import Stepper

LONG_PROMPTS = ["The quick brown fox jumps over the lazy dog, again and again", "Hello there, friend"]
NEW_TOKENS = 6


def small_policies():
    """One instance of every policy with budgets well below the zoo prompts' lengths."""
    return [
        StreamingLLM(sink=2, window=8),
        StreamingLLM(sink=2, window=8, slack=3),  # evicts in blocks: every fourth decode step
        H2O(heavy=6, recent=4),
        H2O(heavy=6, recent=4, slack=2),
        SnapKV(budget=14, window=4, kernel=3),
        PyramidKV(budget=14, window=4, kernel=3, beta=4),
        AdaKV(SnapKV(budget=14, window=4, kernel=3), alpha=0.2),
        Quest(budget=16, page_size=4, dense_layers=1),
        Quest(budget=9, page_size=3, dense_layers=1),  # pages do not tile the storage: entry-wise gather
        Random(budget=12, seed=3),
        KNorm(budget=12),
        HeadWise({(0, 0): None, (1, 0): SnapKV(budget=10, window=2, kernel=3)}, default=StreamingLLM(sink=2, window=6)),
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
        HeadWise({(0, 0): None, (1, 0): SnapKV(budget=4096, window=4, kernel=3)}, default=StreamingLLM(4, 4096)),
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


@pytest.mark.parametrize("policy_index", range(len(small_policies())), ids=[type(p).__name__ for p in small_policies()])
def test_decoding_after_eviction_equals_dense_reference_reading_the_same_entries(family, policy_index):
    """Every decode step of a compressed run == a dense run whose attention sees only the entries the
    compressed run read (the rest hidden), with their true positions: float32, <= 1e-5 (GPT-Neo 2e-5)."""
    model = hooked(family)
    policy = small_policies()[policy_index]
    if isinstance(policy, Quest) and model.num_layers <= policy.dense_for(model.num_layers):
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
        hooks = [] if step == 0 else hide_entries_not_read(read)
        with model.hooks(fwd_hooks=hooks):
            reference = dense.prefill(ids, mask)[:, -1] if step == 0 else dense.step(token)
        worst = max(worst, (logits - reference).abs().max().item())
        token = logits.argmax(-1)
    # H2O's decode steps form their weights explicitly (core.received.attend_and_receive) where the reference
    # runs SDPA: GPT-Neo's unscaled float32 scores, the zoo's largest rounding, then differ by 1.2e-5.
    bound = 2e-5 if family == "gpt_neo" else 1e-5
    assert worst <= bound, f"{family} {type(policy).__name__}: max abs logit diff {worst:.2e}"
    if not isinstance(policy, Quest):
        stored, dense_stored = compressed.cache.kept_counts().sum(), dense.cache.kept_counts().sum()
        assert stored < dense_stored, "the policy evicted nothing"


# -- each policy's selection against an independent reference ----------------------------------------


def kept_sets(cache, layer):
    """Per (row, kv head) the set of true positions the layer stores."""
    positions = cache.kept_positions(layer)
    return [[set(p for p in head.tolist() if p >= 0) for head in row] for row in positions]


def assert_is_a_top_set(kept: set, score: dict, size: int, tolerance: float = 1e-5):
    """`kept` holds `size` of the candidates in `score` (position -> score), none scoring below a dropped one
    (ties may go either way: equal keys, e.g. a repeated token under rotary, have equal norms)."""
    assert len(kept) == size and kept <= set(score)
    dropped = set(score) - kept
    if dropped:
        assert min(score[p] for p in kept) >= max(score[p] for p in dropped) - tolerance


def real_lengths(mask):
    return mask.sum(-1).tolist()


def test_streaming_llm_keeps_sinks_and_the_newest_window_per_row_gpt2():
    model = hooked("gpt2")
    ids, mask = padded_batch(model, LONG_PROMPTS)
    stepper = Stepper(model, compress=StreamingLLM(sink=3, window=5))
    stepper.prefill(ids, mask)
    for row, n in enumerate(real_lengths(mask)):
        expected = {0, 1, 2} | set(range(n - 5, n))
        for layer in range(model.num_layers):
            assert all(head == expected for head in kept_sets(stepper.cache, layer)[row])


def _pattern_and_kept(model, policy, ids, mask):
    stepper = Stepper(model, compress=policy)
    names = lambda n: n.endswith("hook_pattern")  # noqa: E731
    with model.record(names) as rec:
        stepper.prefill(ids, mask)
    return stepper, rec


def test_h2o_keeps_recent_plus_heaviest_accumulated_attention_llama_gqa():
    """Reference: column sums of the recorded prefill pattern over real queries, averaged per KV head."""
    model = hooked("llama")
    ids, mask = padded_batch(model, LONG_PROMPTS)
    heavy, recent = 5, 4
    stepper, rec = _pattern_and_kept(model, H2O(heavy=heavy, recent=recent), ids, mask)
    spec = model.runners[0].spec
    group = spec.num_heads // spec.num_kv_heads
    for layer in range(model.num_layers):
        pattern = rec[f"blocks.{layer}.attn.hook_pattern"][0].activation  # [b, h, p, k]
        received = (pattern * mask[:, None, :, None]).sum(2)  # [b, h, k]
        for row, n in enumerate(real_lengths(mask)):
            pad = ids.shape[1] - n
            for g in range(spec.num_kv_heads):
                score = received[row, g * group : (g + 1) * group].mean(0)[pad:]  # by true position
                recent_set = set(range(n - recent, n))
                kept = kept_sets(stepper.cache, layer)[row][g]
                assert recent_set <= kept
                older = {p: score[p].item() for p in range(n) if p not in recent_set}
                assert_is_a_top_set(kept - recent_set, older, heavy)


def _snapkv_reference(pattern_bhpk, mask, num_kv_heads, budget, window, kernel, pooling):
    """SnapKV by hand: window rows summed, group mean, pooled with an explicit loop; per (row, head) the
    pooled score of every candidate outside the window, by true position."""
    b, h, p, k = pattern_bhpk.shape
    group = h // num_kv_heads
    votes = pattern_bhpk[:, :, p - window :].sum(2).view(b, num_kv_heads, group, k).mean(2)
    kept = []
    for row in range(b):
        pad = int((mask[row] == 0).sum())
        row_sets = []
        for g in range(num_kv_heads):
            pooled = []
            for i in range(k):
                span = range(max(0, i - kernel // 2), min(k, i + kernel // 2 + 1))
                neighbours = [votes[row, g, j].item() for j in span]
                if pooling == "max":
                    pooled.append(max(neighbours))
                else:
                    pooled.append(sum(neighbours) / kernel)
            row_sets.append({i - pad: pooled[i] for i in range(pad, k - window)})
        kept.append(row_sets)
    return kept


@pytest.mark.parametrize("pooling", ["max", "avg"])
@pytest.mark.parametrize("family", ["llama", "bloom"])
def test_snapkv_selection_matches_hand_computed_pooled_window_votes(family, pooling):
    model = hooked(family)
    ids, mask = padded_batch(model, LONG_PROMPTS)
    policy = SnapKV(budget=12, window=4, kernel=5, pooling=pooling)
    stepper, rec = _pattern_and_kept(model, policy, ids, mask)
    for layer in range(model.num_layers):
        pattern = rec[f"blocks.{layer}.attn.hook_pattern"][0].activation
        candidates = _snapkv_reference(pattern, mask, model.runners[layer].spec.num_kv_heads, 12, 4, 5, pooling)
        for row, n in enumerate(real_lengths(mask)):
            window = set(range(n - 4, n))
            for g, kept in enumerate(kept_sets(stepper.cache, layer)[row]):
                assert window <= kept
                assert_is_a_top_set(kept - window, candidates[row][g], 12 - 4)


def test_pyramidkv_layer_budgets_fall_linearly_as_computed_by_hand():
    policy = PyramidKV(budget=128, window=32, beta=20)
    # chosen = 96, lowest = 96 // 20 = 4, highest = 2 * 96 - 4 = 188, step = (188 - 4) // 31 = 5
    budgets = [policy.layer_budget(layer, 32, 1000) for layer in range(32)]
    assert budgets[0] == 188 + 32 and budgets[31] == 188 - 31 * 5 + 32
    assert all(a - b == 5 for a, b in zip(budgets, budgets[1:]))
    # Short prompt: the top is capped at k - window and the bottom raised to keep the average.
    assert PyramidKV(budget=40, window=8, beta=4).layer_budget(0, 2, 50) == 42 + 8  # highest = 50 - 8
    assert PyramidKV(budget=40, window=8, beta=4).layer_budget(1, 2, 50) == 22 + 8  # lowest = 64 - 42
    assert PyramidKV(budget=4096).layer_budget(0, 4, 100) == 100


def test_adakv_splits_a_layer_budget_across_heads_by_global_top_k():
    scores = torch.tensor([[[9.0, 8.0, 7.0, 6.0, 5.0, 4.0], [1.0, 0.5, 0.2, 0.1, 0.0, -1.0]]])
    # alpha 0: the 2 * 3 best scores of the layer are all head 0's.
    keep = AdaKV(alpha=0.0).choose_keep(scores, 3)
    assert keep[0, 0].tolist() == [0, 1, 2, 3, 4, 5] and keep[0, 1].tolist() == [-1] * 6
    # alpha 2/3: each head is guaranteed int(2/3 * 3) = 2 of its own best, the other 2 go to the best left.
    keep = AdaKV(alpha=2 / 3).choose_keep(scores, 3)
    assert keep[0, 0].tolist() == [0, 1, 2, 3] and keep[0, 1].tolist() == [0, 1, -1, -1]
    # alpha 1: uniform, every head its own top 3.
    keep = AdaKV(alpha=1.0).choose_keep(scores, 3)
    assert keep[0, 0].tolist() == [0, 1, 2] and keep[0, 1].tolist() == [0, 1, 2]


def test_adakv_heads_keep_unequal_counts_stored_compactly_llama():
    model = hooked("llama")
    ids, mask = padded_batch(model, LONG_PROMPTS[:1])
    stepper = Stepper(model, compress=AdaKV(SnapKV(budget=12, window=2, kernel=3), alpha=0.0))
    stepper.prefill(ids, mask)
    counts = stepper.cache.kept_counts()  # [layers, b, g]
    g = model.runners[0].spec.num_kv_heads
    assert torch.equal(counts.sum(-1), torch.full((model.num_layers, 1), 12 * g))
    assert (counts.amax(-1) > counts.amin(-1)).any(), "all heads kept the same count"
    assert all(layer.storage.prefix is not None for layer in stepper.cache.layers)


def test_quest_reads_the_pages_with_the_highest_hand_computed_bound():
    torch.manual_seed(0)
    page_size, num_pages, d = 4, 6, 8
    policy = Quest(budget=12, page_size=page_size, dense_layers=0)
    layer = HookedCacheLayer(0, 1, policy)
    keys = torch.randn(1, 1, page_size * num_pages - 1, d)  # the last page is partial
    n = keys.shape[2]
    query = torch.randn(1, 1, 1, d)
    bounds = []
    for page in range(num_pages):
        block = keys[0, 0, page * page_size : (page + 1) * page_size]
        lo, hi = block.min(0).values, block.max(0).values
        bounds.append(sum(max(query[0, 0, 0, i] * lo[i], query[0, 0, 0, i] * hi[i]).item() for i in range(d)))
    best_other = sorted(range(num_pages - 1), key=lambda p: -bounds[p])[:2]
    expected_pages = sorted(best_other + [num_pages - 1])  # 12 // 4 = 3 pages, the newest always
    spec = AttentionSpec(num_heads=1, num_kv_heads=1, head_dim=d, scaling=1.0)
    hooks = CacheHooks(0, spec.head_dims)
    no_padding = torch.zeros(1, n - 1, dtype=torch.bool)
    prefill = ForwardContext(0, torch.arange(n - 1).view(1, n - 1), no_padding, False)
    layer.write_and_read(keys[:, :, :-1], keys[:, :, :-1], prefill, hooks, torch.randn(1, 1, n - 1, d), spec)
    context = ForwardContext(1, torch.tensor([[n - 1]]), torch.zeros(1, 1, dtype=torch.bool), False)
    read = layer.write_and_read(keys[:, :, -1:], keys[:, :, -1:], context, hooks, query, spec)
    keys_read, positions_read, hidden = read.keys, read.positions, read.has_invisible_slots
    assert not hidden
    expected = [p * page_size + i for p in expected_pages for i in range(page_size)]
    assert positions_read[0, 0].tolist() == [p for p in expected if p < n]  # the read ends at the last entry
    assert torch.equal(keys_read[0, 0, :8], keys[0, 0, [expected[i] for i in range(8)]])


def test_quest_decode_step_reads_budget_pages_only_bloom():
    model = hooked("bloom")
    ids, mask = padded_batch(model, LONG_PROMPTS[:1])
    stepper = Stepper(model, compress=Quest(budget=16, page_size=4, dense_layers=1))
    logits = stepper.prefill(ids, mask)[:, -1]
    with model.record(lambda n: n.endswith("hook_k_read")) as rec:
        stepper.step(logits.argmax(-1))
    assert rec["blocks.0.cache.hook_k_read"][0].activation.shape[2] == ids.shape[1] + 1  # dense layer
    n = ids.shape[1] + 1
    partial_page_gap = -n % 4  # the newest page is read only up to the newest entry
    assert rec["blocks.1.cache.hook_k_read"][0].activation.shape[2] == 16 - partial_page_gap
    assert stepper.cache.physical_lengths == [ids.shape[1] + 1] * 2  # nothing evicted


def test_knorm_keeps_the_smallest_key_norms_gpt_neox():
    model = hooked("gpt_neox")
    ids, mask = padded_batch(model, LONG_PROMPTS[:1])
    stepper = Stepper(model, compress=KNorm(budget=10))
    with model.record(lambda n: n.endswith("hook_k_write")) as rec:
        stepper.prefill(ids, mask)
    for layer in range(model.num_layers):
        norms = rec[f"blocks.{layer}.cache.hook_k_write"][0].activation.norm(dim=-1)  # [b, g, p]
        for g in range(norms.shape[1]):
            negative_norm = {p: -norms[0, g, p].item() for p in range(norms.shape[2])}
            assert_is_a_top_set(kept_sets(stepper.cache, layer)[0][g], negative_norm, 10)


def test_random_is_reproducible_by_seed_and_keeps_the_budget_opt():
    model = hooked("opt")
    ids, mask = padded_batch(model, LONG_PROMPTS[:1])
    kept = []
    for seed in (1, 1, 2):
        stepper = Stepper(model, compress=Random(budget=10, seed=seed))
        stepper.prefill(ids, mask)
        kept.append(kept_sets(stepper.cache, 0))
        assert stepper.cache.physical_lengths == [10] * model.num_layers
    assert kept[0] == kept[1] and kept[0] != kept[2]


# -- hooks, memory, batches, bad input -----------------------------------------------------------------


def test_hook_keep_overwrites_the_keep_set_and_hook_scores_sees_the_scores_mistral():
    model = hooked("mistral")
    ids, mask = padded_batch(model, LONG_PROMPTS[:1])
    stepper = Stepper(model, compress=SnapKV(budget=8, window=2, kernel=3))
    seen = {}

    def first_eight(keep_bgn, hook):
        return torch.arange(8).expand_as(keep_bgn).clone()

    def look(scores_bgk, hook):
        seen[hook.name] = scores_bgk.clone()

    hooks = [("blocks.0.cache.hook_keep", first_eight), ("blocks.1.cache.hook_scores", look)]
    with model.hooks(fwd_hooks=hooks):
        stepper.prefill(ids, mask)
    assert all(head == set(range(8)) for head in kept_sets(stepper.cache, 0)[0])
    scores = seen["blocks.1.cache.hook_scores"]
    assert scores.shape == (1, model.runners[1].spec.num_kv_heads, ids.shape[1])
    assert torch.isinf(scores[..., -2:]).all()  # the observation window is protected


def test_hook_keep_edited_in_place_is_checked_and_carried_out_like_a_returned_one_llama():
    """An in-place edit returns the policy's own tensor: it must still be range-checked (eviction), sorted
    into stored order (eviction) and read as edited (Quest's page gather would otherwise ignore it)."""
    model = hooked("llama")
    ids = model.to_tokens(LONG_PROMPTS[0])

    def out_of_range(keep_bgn, hook):
        keep_bgn[..., 0] = 10_000

    with model.hooks(fwd_hooks=[("blocks.0.cache.hook_keep", out_of_range)]):
        with pytest.raises(ValueError, match=r"hook_keep: indices must be in \[0, "):
            Stepper(model, compress=SnapKV(budget=8, window=2, kernel=3)).prefill(ids)

    def reverse(keep_bgn, hook):
        keep_bgn.copy_(keep_bgn.flip(-1))

    stepper = Stepper(model, compress=SnapKV(budget=8, window=2, kernel=3))
    with model.hooks(fwd_hooks=[("blocks.0.cache.hook_keep", reverse)]):
        stepper.prefill(ids)
    positions = stepper.cache.layers[0].read()[2]
    assert torch.equal(positions, positions.sort(-1).values)  # kept in stored (ascending) order

    def first_entries(keep_bgn, hook):
        keep_bgn.copy_(torch.arange(keep_bgn.shape[-1]).expand_as(keep_bgn))

    quest = Stepper(model, compress=Quest(budget=8, page_size=4, dense_layers=1))
    token = quest.prefill(ids)[:, -1].argmax(-1)
    read = {}
    hooks = [("blocks.1.cache.hook_keep", first_entries),
             ("blocks.1.cache.hook_positions", lambda positions, hook: read.update(positions=positions.clone()))]
    with model.hooks(fwd_hooks=hooks):
        quest.step(token)
    b, g, n = read["positions"].shape
    assert torch.equal(read["positions"], torch.arange(n).expand(b, g, n))


def test_hook_v_read_edited_in_place_on_a_quest_read_patches_like_a_returned_tensor_llama():
    """A Quest decode step mixes values from storage; a hook editing the copy it was shown must still count."""
    model = hooked("llama")
    ids = model.to_tokens(LONG_PROMPTS[0])

    def step_logits(hook_fn):
        stepper = Stepper(model, compress=Quest(budget=8, page_size=4, dense_layers=1))
        token = stepper.prefill(ids)[:, -1].argmax(-1)
        with model.hooks(fwd_hooks=[] if hook_fn is None else [("blocks.1.cache.hook_v_read", hook_fn)]):
            return stepper.step(token)

    def zero_in_place(values, hook):
        values.zero_()

    in_place = step_logits(zero_in_place)
    assert torch.equal(in_place, step_logits(lambda values, hook: torch.zeros_like(values)))
    assert not torch.equal(in_place, step_logits(None))


def test_hook_scores_edited_in_place_leaves_h2o_running_scores_alone_llama():
    """H2O with recent=0 scores with its running sums themselves: the hook must get its own tensor. A uniform
    in-place shift keeps every choice, so the running scores stored must be those of an unhooked run."""
    model = hooked("llama")
    ids = model.to_tokens(LONG_PROMPTS[0])

    def shift(scores_bgk, hook):
        scores_bgk += 100.0

    def running_scores(fwd_hooks):
        stepper = Stepper(model, compress=H2O(heavy=6, recent=0))
        with model.hooks(fwd_hooks=fwd_hooks):
            token = stepper.prefill(ids)[:, -1].argmax(-1)
            for _ in range(3):
                token = stepper.step(token).argmax(-1)
        return [layer.storage.read_entry_scores() for layer in stepper.cache.layers]

    hooked_scores = running_scores([(f"blocks.{i}.cache.hook_scores", shift) for i in range(model.num_layers)])
    for with_hook, without in zip(hooked_scores, running_scores([])):
        assert torch.equal(with_hook, without)


def test_adakv_cache_bytes_fall_with_the_budget_llama():
    """Memory target: AdaKV at budget B on an L-token prompt holds <= (B / L) * full + 5% tensor bytes."""
    model = hooked("llama")
    ids = torch.randint(0, 250, (1, 200))
    full = Stepper(model)
    full.prefill(ids)
    budget = 25
    compressed = Stepper(model, compress=AdaKV(SnapKV(budget=budget, window=4, kernel=5), alpha=0.2))
    compressed.prefill(ids)
    ratio = compressed.cache.nbytes / full.cache.nbytes
    assert ratio <= budget / ids.shape[1] * 1.05, ratio
    counts = compressed.cache.kept_counts()
    assert (counts.amax(-1) > counts.amin(-1)).any()


def test_compression_with_beam_search_and_sampling_runs_and_keeps_budgets_qwen2():
    model = hooked("qwen2")
    ids, mask = padded_batch(model, LONG_PROMPTS)
    out = model.generate(ids, attention_mask=mask, max_new_tokens=4, num_beams=3, compress=H2O(heavy=4, recent=4))
    assert out.shape == (2, ids.shape[1] + 4)
    out = model.generate(ids, attention_mask=mask, max_new_tokens=4, do_sample=True, num_return_sequences=2,
                         compress=AdaKV(SnapKV(budget=10, window=2, kernel=3)))
    assert out.shape == (4, ids.shape[1] + 4)


def test_rewind_after_eviction_is_refused_and_fork_is_independent_phi():
    model = hooked("phi")
    ids, mask = padded_batch(model, LONG_PROMPTS[:1])
    stepper = Stepper(model, compress=StreamingLLM(sink=2, window=6))
    logits = stepper.prefill(ids, mask)[:, -1]
    branch = stepper.fork()
    a = stepper.step(logits.argmax(-1))
    b = branch.step(logits.argmax(-1))
    assert torch.equal(a, b)
    with pytest.raises(ValueError, match="evicted"):
        stepper.rewind(1)


BAD_POLICIES = [
    (lambda: SnapKV(budget=0), "budget must be >= 1"),
    (lambda: SnapKV(budget=-0.5), r"ratio must be in \(0, 1\]"),
    (lambda: SnapKV(budget=1.5), r"ratio must be in \(0, 1\]"),
    (lambda: SnapKV(budget=16, window=16), "window .16. must be smaller than the budget"),
    (lambda: PyramidKV(budget=16, window=32), "window"),
    (lambda: SnapKV(budget=64, kernel=4), "kernel must be odd"),
    (lambda: SnapKV(budget=64, pooling="mean"), "pooling must be"),
    (lambda: Quest(budget=64, page_size=0), "page_size must be an integer >= 1"),
    (lambda: Quest(budget=8, page_size=16), "must be >= page_size"),
    (lambda: AdaKV(alpha=1.5), r"alpha .* must be in \[0, 1\]"),
    (lambda: AdaKV(alpha=-0.1), r"alpha .* must be in \[0, 1\]"),
    (lambda: AdaKV(base=H2O()), "AdaKV base must be"),
    (lambda: H2O(heavy=0, recent=0), "budget"),
    (lambda: StreamingLLM(sink=-1), "sink must be an integer >= 0"),
    (lambda: StreamingLLM(window=0), "window must be an integer >= 1"),
    (lambda: StreamingLLM(slack=-1), "slack must be an integer >= 0"),
    (lambda: H2O(slack=1.5), "slack must be an integer >= 0"),
    (lambda: PyramidKV(budget=64, beta=0), "beta must be an integer >= 1"),
]


@pytest.mark.parametrize("make, message", BAD_POLICIES)
def test_bad_parameters_raise_value_error_naming_the_parameter(make, message):
    with pytest.raises(ValueError, match=message):
        make()


def test_policy_the_model_cannot_serve_raises_falcon():
    model = hooked("falcon")
    ids, _ = padded_batch(model, LONG_PROMPTS[:1])
    with pytest.raises(ValueError, match="dense_layers must be < the model's 2 layers"):
        model.generate(ids, max_new_tokens=2, compress=Quest(budget=16, page_size=4, dense_layers=2))
    with pytest.raises(ValueError, match="compress must be a policy"):
        model.new_cache(compress=3)  # (a spec string like "snapkv" is accepted)
    with pytest.raises(ValueError, match="either compress= or past_key_values="):
        model.generate(ids, max_new_tokens=2, compress=KNorm(8), past_key_values=model.new_cache())


@pytest.mark.parametrize("budget", [16, 24, 64, 256])
def test_defaults_construct_and_run_on_every_zoo_model_at_every_budget(family, budget):
    """Only the budget given (SnapKV's window and Quest's dense layers take their documented defaults):
    every policy runs on every zoo model, and evicts where the prompt is longer than the budget."""
    model = hooked(family)
    ids = torch.randint(0, 250, (1, 300), generator=torch.Generator().manual_seed(0))
    for policy in [policy_with_budget(cls, budget) for cls in policy_classes()]:
        # min_new_tokens: a random-weight model may otherwise end on EOS after one token (seen: gpt_neox)
        out = model.generate(ids, max_new_tokens=2, min_new_tokens=2, compress=policy)
        assert out.shape == (1, 302), (family, policy)
    assert parse_policy("adakv:budget=24,alpha=0.2") == AdaKV(SnapKV(budget=24), alpha=0.2)


def test_ratio_budget_resolves_against_the_stored_entries_gemma2():
    model = hooked("gemma2")
    ids = torch.randint(0, 250, (1, 40))
    stepper = Stepper(model, compress=KNorm(budget=0.25))
    stepper.prefill(ids)
    assert stepper.cache.physical_lengths == [10, 10]
    assert stepper.cache.layer_budgets == [10, 10]
    assert math.isclose(stepper.cache.kept_counts().float().mean().item(), 10)
    assert F is not None


def test_a_spec_string_compresses_as_the_policy_it_names_in_python_too_llama():
    model = hooked("llama")
    ids, mask = padded_batch(model, LONG_PROMPTS)
    from_spec = model.generate(ids, attention_mask=mask, max_new_tokens=NEW_TOKENS, do_sample=False,
                               compress="snapkv:budget=14,window=4,kernel=3")
    from_policy = model.generate(ids, attention_mask=mask, max_new_tokens=NEW_TOKENS, do_sample=False,
                                 compress=SnapKV(budget=14, window=4, kernel=3))
    assert torch.equal(from_spec, from_policy)
    assert Stepper(model, compress="quest:budget=16,page_size=4,dense_layers=1").cache.policy == Quest(16, 4, 1)
    with pytest.raises(ValueError, match="unknown compression policy 'lru'; accepted: adakv"):
        model.new_cache(compress="lru:budget=4")


@pytest.mark.parametrize("policy", [SnapKV(budget=48, window=8), SnapKV(budget=48, window=8, pooling="avg"),
                                    PyramidKV(budget=48, window=8), AdaKV(SnapKV(budget=48, window=8)),
                                    SnapKV(budget=0.3), KNorm(budget=0.25), AdaKV(PyramidKV(budget=0.4)),
                                    Random(budget=0.5), Quest(budget=48, page_size=16, dense_layers=1),
                                    Quest(budget=24, page_size=8, dense_layers=0),
                                    Random(budget=48, seed=1), KNorm(budget=48), StreamingLLM(4, 44), H2O(24, 24),
                                    HeadWise({(1, 0): None}, default=SnapKV(budget=48, window=8))],
                         ids=lambda p: f"{type(p).__name__}-{getattr(p, 'budget', '')}")
def test_a_prompt_keeps_the_same_entries_alone_and_left_padded_beside_a_longer_one_llama(policy):
    """Padding of 37 slots (no multiple of the pooling kernel): same kept positions, same greedy tokens.
    Ratio budgets resolve over each row's real entries, so the two rows keep different counts."""
    model = hooked("llama")
    generator = torch.Generator().manual_seed(0)
    long, short = torch.randint(0, 250, (1, 120), generator=generator), torch.randint(0, 250, (1, 83), generator=generator)
    pad = torch.full((1, 37), model.tokenizer.pad_token_id)
    batch = torch.cat([long, torch.cat([pad, short], 1)])
    mask = torch.cat([torch.ones(1, 120), torch.cat([torch.zeros(1, 37), torch.ones(1, 83)], 1)]).long()
    together, alone = Stepper(model, compress=policy), Stepper(model, compress=policy)
    together.prefill(batch, mask)
    alone.prefill(short)
    for layer in range(model.num_layers):
        assert kept_sets(together.cache, layer)[1] == kept_sets(alone.cache, layer)[0], (type(policy).__name__, layer)
    tokens = model.generate(batch, attention_mask=mask, max_new_tokens=8, do_sample=False, compress=policy)[1, 120:]
    assert torch.equal(tokens, model.generate(short, max_new_tokens=8, do_sample=False, compress=policy)[0, 83:])
