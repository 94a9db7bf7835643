"""Step-selective patching, patching from a source run, and sweeps (zoo llama, gpt2, bloom, gpt_neox, falcon)."""

from __future__ import annotations

import itertools

import pytest
import torch
from conftest import hooked, padded_batch

from interp_cache.analysis.patching import (
    MissingSourceError,
    Selection,
    add,
    at,
    from_source,
    replace_with,
    scale,
    zero,
)
from interp_cache.decoding import Stepper
from interp_cache.analysis.sweep import feed, logit_diff, sweep

# llama: GQA 4 query / 2 KV heads; gpt2: learned positions; bloom: ALiBi; gpt_neox: partial rotary,
# parallel residual; falcon: multi-query (1 KV head), rotary.
PATCH_FAMILIES = ["llama", "gpt2", "bloom", "gpt_neox", "falcon"]
POSITION_FAMILIES = ["llama", "gpt2", "bloom", "gpt_neox"]


def greedy_logits(model, input_ids, attention_mask, num_steps, fwd_hooks=()):
    """Last-position logits of the prefill and of each of `num_steps` greedy decode steps."""
    with model.hooks(fwd_hooks=list(fwd_hooks)):
        stepper = Stepper(model)
        logits = [stepper.prefill(input_ids, attention_mask)[:, -1]]
        for _ in range(num_steps):
            logits.append(stepper.step(logits[-1].argmax(-1)))
    return logits


def feed_in_chunks(model, input_ids, attention_mask, splits, fwd_hooks=()):
    """Final logits after feeding the sequence in chunks ending at `splits` (then to the end)."""
    bounds = [0, *splits, input_ids.shape[1]]
    with model.hooks(fwd_hooks=list(fwd_hooks)):
        stepper = Stepper(model)
        for start, end in itertools.pairwise(bounds):
            logits = stepper.prefill(input_ids[:, start:end], attention_mask[:, start:end])
    return logits[:, -1]


def no_hooks_left(model) -> bool:
    return all(not point._forward_hooks for point in model.hook_dict.values())


def corrupt(input_ids, attention_mask, seed=1):
    """Random real tokens where the mask is 1, the same padding: a corrupted prompt of identical layout."""
    generator = torch.Generator().manual_seed(seed)
    noise = torch.randint(65, 122, input_ids.shape, generator=generator)
    return torch.where(attention_mask.bool(), noise, input_ids)


# -- step-selective patching ---------------------------------------------------------------------------
@pytest.mark.parametrize("family", PATCH_FAMILIES)
def test_patch_at_step_s_leaves_earlier_steps_bitwise_and_changes_step_s(family):
    model = hooked(family)
    input_ids, attention_mask = padded_batch(model)
    s = 3
    v = torch.randn(hidden_size(model), generator=torch.Generator().manual_seed(0))  # not constant: LayerNorm
    baseline = greedy_logits(model, input_ids, attention_mask, 5)
    # The pattern hook moves attention to the explicit path for every step, so its baseline is the same
    # hook attached but never selected.
    pattern_baseline = greedy_logits(model, input_ids, attention_mask, 5,
                                     [("blocks.0.attn.hook_pattern", at(zero(), steps=99))])
    cases = {
        "resid_post": ([("blocks.0.hook_resid_post", at(add(v), steps=range(s, s + 5)))],
                       baseline),
        "z head 1": ([("blocks.0.attn.hook_z", at(zero(), steps=s, heads=1))], baseline),
        "pattern head 2 at step 0 only": ([("blocks.0.attn.hook_pattern", at(zero(), steps=0, heads=2))],
                                          pattern_baseline),
        "pattern": ([("blocks.0.attn.hook_pattern", at(scale(0.5), steps=range(s, s + 2)))], pattern_baseline),
    }
    for label, (fwd_hooks, reference) in cases.items():
        patched = greedy_logits(model, input_ids, attention_mask, 5, fwd_hooks)
        first = 0 if "step 0" in label else s
        for step in range(first):
            assert torch.equal(patched[step], reference[step]), (label, step)
        assert (patched[first] - reference[first]).abs().max().item() > 1e-3, label
    assert no_hooks_left(model)


def hidden_size(model) -> int:
    return model.hf_model.get_input_embeddings().weight.shape[1]


@pytest.mark.parametrize("family", POSITION_FAMILIES)
def test_patch_at_absolute_position_means_the_same_token_in_prefill_chunked_prefill_and_decode(family):
    model = hooked(family)
    input_ids, attention_mask = padded_batch(model)
    total = input_ids.shape[1]
    p = 36  # row 0: column 36; row 1 (left padded): a later column; fed in the second chunk / a decode step
    generator = torch.Generator().manual_seed(0)
    v = 4 * torch.randn(hidden_size(model), generator=generator)
    patches = {
        "resid_post": [("blocks.0.hook_resid_post", at(add(v), positions=p))],
        "z head 3": [("blocks.0.attn.hook_z", at(scale(-2.0), positions=[p], heads=3))],
        "pattern query row": [("blocks.0.attn.hook_pattern", at(replace_with(torch.tensor(0.0)), positions=p))],
        "pattern key column": [("blocks.0.attn.hook_pattern", at(zero(), key_positions=p))],
        "k_read entry": [("blocks.0.cache.hook_k_read", at(scale(3.0), positions=p))],
        "v_write kv head 0": [("blocks.0.cache.hook_v_write", at(zero(), positions=p, heads=0))],
    }
    unpatched = feed_in_chunks(model, input_ids, attention_mask, [])
    for label, fwd_hooks in patches.items():
        prefill = feed_in_chunks(model, input_ids, attention_mask, [], fwd_hooks)
        chunked = feed_in_chunks(model, input_ids, attention_mask, [34], fwd_hooks)
        decoded = feed_in_chunks(model, input_ids, attention_mask, list(range(34, total)), fwd_hooks)
        assert (chunked - prefill).abs().max().item() <= 1e-5, label
        assert (decoded - prefill).abs().max().item() <= 1e-5, label
        assert (prefill - unpatched).abs().max().item() > 1e-3, label
    assert no_hooks_left(model)


def test_hook_sees_the_same_selected_slots_however_the_sequence_is_fed():
    model = hooked("llama")
    input_ids, attention_mask = padded_batch(model)
    selected = Selection.of(positions=[5, 36], heads=[1])
    for splits in ([], [30], list(range(30, input_ids.shape[1]))):
        seen = []

        def count(activation, hook, seen=seen):
            mask = selected.mask(activation, hook)
            seen.append(0 if mask is None else int(mask.expand(activation.shape)[..., 0].sum()))

        feed_in_chunks(model, input_ids, attention_mask, splits, [("blocks.1.attn.hook_z", count)])
        assert sum(seen) == 3  # position 5 in both rows, 36 in row 0 only (row 1 is shorter); one head
    assert no_hooks_left(model)


def test_bad_selectors_are_clear_errors_and_hooks_are_removed():
    model = hooked("llama")
    input_ids, attention_mask = padded_batch(model)
    for kwargs, message in [
        ({"steps": -1}, r"steps= must be non-negative integers; got -1"),
        ({"positions": [3, -2]}, r"positions= must be non-negative integers; got -2"),
        ({"heads": 1.5}, r"heads= must be an int, an iterable of ints"),
        ({"steps": [True]}, r"steps= must be non-negative integers; got True"),
        ({"positions": []}, r"positions= is empty, so it selects nothing; pass None"),
        ({"positions": torch.tensor([1.0])}, r"positions= must hold integers; got a torch.float32 tensor"),
    ]:
        with pytest.raises(ValueError, match=message):
            at(zero(), **kwargs)
    cases = [
        ("blocks.0.attn.hook_z", {"heads": 4},
         r"heads=\[4\] out of range for 'blocks.0.attn.hook_z', which has 4 heads \(indices 0..3\) on axis 2"),
        ("blocks.0.cache.hook_k_read", {"heads": 2}, r"which has 2 heads"),  # KV heads (GQA)
        ("blocks.0.hook_resid_post", {"heads": 0},
         r"heads= cannot select on 'blocks.0.hook_resid_post': it has no head axis"),
        ("blocks.0.hook_resid_post", {"key_positions": 0}, r"key_positions= selects key columns of \[b, h, p, k\]"),
        ("blocks.0.cache.hook_v_read", {"key_positions": 0}, r"its entries are selected by positions="),
    ]
    for name, kwargs, message in cases:
        cache = model.new_cache()
        with pytest.raises(ValueError, match=message):
            model.run_with_hooks(input_ids, attention_mask=attention_mask, past_key_values=cache, use_cache=True,
                                 fwd_hooks=[(name, at(zero(), steps=5, **kwargs))])  # checked even off-step
        assert no_hooks_left(model) and model.context is None
        assert cache.logical_length == 0
    with pytest.raises(ValueError, match=r"positions= cannot select on 'blocks.0.cache.hook_keep'.*steps= only"):
        keep = model.hook_point("blocks.0.cache.hook_keep")
        Selection.of(positions=3).check(keep.name, keep.layout, torch.zeros(1, 2, 3, dtype=torch.long))
    with pytest.raises(TypeError, match="at\\(\\) needs a hook function"):
        at(torch.zeros(3))


def test_replace_with_a_tensor_of_the_wrong_shape_names_the_hook():
    model = hooked("gpt2")
    input_ids, attention_mask = padded_batch(model)
    with pytest.raises(ValueError, match=r"replace_with: a tensor of shape \(7,\) cannot replace "
                                         r"'blocks.1.hook_attn_out' of shape \(2, 43, 64\) \(at step 0\)"):
        model.run_with_hooks(input_ids, attention_mask=attention_mask,
                             fwd_hooks=[("blocks.1.hook_attn_out", at(replace_with(torch.zeros(7)), positions=2))])
    assert no_hooks_left(model)


def test_padding_tokens_are_never_selected():
    model = hooked("gpt2")
    input_ids, attention_mask = padded_batch(model)
    with model.record("blocks.0.hook_resid_post") as plain:
        feed(model, input_ids, attention_mask)
    shift = [("blocks.0.hook_resid_post", at(add(torch.ones(64)), positions=0))]
    with model.hooks(fwd_hooks=shift), model.record("blocks.0.hook_resid_post") as patched:
        feed(model, input_ids, attention_mask)
    before = plain["blocks.0.hook_resid_post"][0].activation
    after = patched["blocks.0.hook_resid_post"][0].activation
    changed_bp = (after != before).any(-1)
    first_real = int((attention_mask[1] == 0).sum())
    assert changed_bp.nonzero().tolist() == [[0, 0], [1, first_real]]  # position 0 of each row, no padding slot


# -- patching from a source run ------------------------------------------------------------------------
@pytest.mark.parametrize("family", PATCH_FAMILIES)
def test_all_hooks_from_a_source_with_the_same_input_reproduce_its_logits_exactly(family):
    model = hooked(family)
    input_ids, attention_mask = padded_batch(model)
    with model.record() as source:
        source_logits = greedy_logits(model, input_ids, attention_mask, 6)
    target_logits = greedy_logits(model, input_ids, attention_mask, 6, from_source(source))
    assert len(source.names()) >= 30
    assert all(torch.equal(a, b) for a, b in zip(source_logits, target_logits))
    assert no_hooks_left(model)


def test_all_hooks_from_a_source_reproduce_it_exactly_under_cache_compression():
    # Evicted entries and head-wise key positions (H2O), per-step selections (Quest) and the policy hooks
    # themselves (aligned by step) all replay exactly.
    from interp_cache.compress import H2O, Quest, StreamingLLM

    model = hooked("llama")
    input_ids, attention_mask = padded_batch(model)
    for policy in (StreamingLLM(sink=4, window=12), H2O(heavy=8, recent=8), Quest(budget=16, page_size=4,
                                                                                    dense_layers=0)):
        def run(fwd_hooks=(), policy=policy):
            with model.hooks(fwd_hooks=list(fwd_hooks)):
                stepper = Stepper(model, compress=policy)
                logits = [stepper.prefill(input_ids, attention_mask)[:, -1]]
                for _ in range(5):
                    logits.append(stepper.step(logits[-1].argmax(-1)))
            return logits

        with model.record() as source:
            expected = run()
        assert "blocks.1.cache.hook_keep" in source
        replayed = run(from_source(source))
        assert all(torch.equal(a, b) for a, b in zip(expected, replayed)), type(policy).__name__
        plain = run()  # the recording hooked scores and pattern: another attention path, so a new baseline
        patched = run([("blocks.0.cache.hook_v_read", at(zero(), steps=3))])
        assert all(torch.equal(a, b) for a, b in zip(plain[:3], patched[:3]))
        assert (plain[3] - patched[3]).abs().max().item() > 1e-3


def test_all_hooks_from_a_generate_source_reproduce_its_logits_through_generate():
    model = hooked("llama")
    input_ids, attention_mask = padded_batch(model)
    kwargs = {"max_new_tokens": 5, "do_sample": False, "eos_token_id": None, "output_logits": True,
              "return_dict_in_generate": True}
    with model.record() as source:
        expected = model.generate(input_ids, attention_mask=attention_mask, **kwargs)
    with model.hooks(fwd_hooks=from_source(source)):
        replayed = model.generate(input_ids, attention_mask=attention_mask, **kwargs)
    assert torch.equal(replayed.sequences, expected.sequences)
    assert all(torch.equal(a, b) for a, b in zip(replayed.logits, expected.logits))


@pytest.mark.parametrize("family", PATCH_FAMILIES)
def test_last_resid_post_from_a_clean_source_makes_a_corrupted_run_give_the_clean_logits(family):
    model = hooked(family)
    input_ids, attention_mask = padded_batch(model)
    corrupted_ids = corrupt(input_ids, attention_mask)
    last = f"blocks.{model.num_layers - 1}.hook_resid_post"
    with model.record(last) as source:
        clean = greedy_logits(model, input_ids, attention_mask, 6)
    unpatched = greedy_logits(model, corrupted_ids, attention_mask, 6)
    patched = greedy_logits(model, corrupted_ids, attention_mask, 6, from_source(source))
    assert all(torch.equal(a, b) for a, b in zip(patched, clean))
    assert (unpatched[0] - clean[0]).abs().max().item() > 1e-1


@pytest.mark.parametrize("family", PATCH_FAMILIES)
def test_source_and_target_fed_differently_align_by_absolute_position(family):
    # Source: one prefill over the clean sequence. Target: the corrupted sequence, prefill of 30 tokens
    # then one decode step per token. Patching layer 0's input at every position makes the target compute
    # the clean function, so it must land on the clean logits (up to cached-vs-uncached rounding).
    model = hooked(family)
    input_ids, attention_mask = padded_batch(model)
    corrupted_ids = corrupt(input_ids, attention_mask)
    with model.record("blocks.0.hook_resid_pre") as source:
        clean = feed(model, input_ids, attention_mask)[:, -1]
    with model.hooks(fwd_hooks=from_source(source)):
        patched = feed(model, corrupted_ids, attention_mask, prefill=30)[:, -1]
    corrupted = feed(model, corrupted_ids, attention_mask, prefill=30)[:, -1]
    assert (patched - clean).abs().max().item() <= 1e-5
    assert (corrupted - clean).abs().max().item() > 1e-1


@pytest.mark.parametrize("family", ["llama", "falcon", "bloom"])
def test_keyed_and_cache_entry_hooks_align_by_query_and_key_position(family):
    # Source: clean, prefill of 30 columns then decode steps. Target: corrupted, one prefill, so every
    # query row and key column sits at another place than in the source.
    model = hooked(family)
    input_ids, attention_mask = padded_batch(model)
    corrupted_ids = corrupt(input_ids, attention_mask)
    pattern, keys, positions = ("blocks.1.attn.hook_pattern", "blocks.1.cache.hook_k_read",
                                "blocks.1.cache.hook_positions")
    with model.record([pattern, keys, positions]) as source:
        feed(model, input_ids, attention_mask, prefill=30)
    with model.hooks(fwd_hooks=from_source(source, names=pattern, heads=[0])), model.record(pattern) as target:
        feed(model, corrupted_ids, attention_mask)
    with model.record([pattern, keys, positions]) as unpatched:
        feed(model, corrupted_ids, attention_mask)
    source_pattern = {call.step: call.activation for call in source[pattern]}
    pattern_bhpk = target[pattern][0].activation
    plain_bhpk = unpatched[pattern][0].activation
    pads = int((attention_mask[1] == 0).sum())
    for row, offset, queries in ((0, 0, (31, 40)), (1, pads, (3, 9))):
        for query in queries:
            column = offset + query
            step_row_k = source_pattern[column - 29][row, 0, 0]  # keys: every column up to the query's
            assert torch.equal(pattern_bhpk[row, 0, column, offset:column + 1], step_row_k[offset:])
            # Keys after the query keep the target's own (masked) values: the source never formed them.
            assert torch.equal(pattern_bhpk[row, 0, column, column + 1:], plain_bhpk[row, 0, column, column + 1:])
        assert not torch.equal(pattern_bhpk[row, 0], plain_bhpk[row, 0])
        assert torch.equal(pattern_bhpk[row, 1:], plain_bhpk[row, 1:])  # heads not selected

    with model.hooks(fwd_hooks=from_source(source, names=[keys, positions])), model.record(keys) as target:
        feed(model, corrupted_ids, attention_mask)
    source_keys_bgkd = source[keys][-1].activation  # the last step reads every entry
    target_keys_bgkd = target[keys][0].activation
    plain_keys_bgkd = unpatched[keys][0].activation
    assert torch.equal(target_keys_bgkd[0], source_keys_bgkd[0])
    assert torch.equal(target_keys_bgkd[1, :, pads:], source_keys_bgkd[1, :, pads:])
    assert torch.equal(target_keys_bgkd[1, :, :pads], plain_keys_bgkd[1, :, :pads])  # padding entries: no position
    assert not torch.equal(target_keys_bgkd, plain_keys_bgkd)


def test_a_position_the_source_never_ran_is_a_clear_error():
    model = hooked("llama")
    input_ids, attention_mask = padded_batch(model)
    with model.record("blocks.0.hook_resid_post") as source:
        feed(model, input_ids[:, :40], attention_mask[:, :40])
    cache = model.new_cache()
    with pytest.raises(MissingSourceError, match=r"no value of 'blocks.0.hook_resid_post' for row 0 position 40.*"
                                                 r"target step 0.*covers positions 0..39"):
        model.run_with_hooks(input_ids, attention_mask=attention_mask, past_key_values=cache, use_cache=True,
                             fwd_hooks=from_source(source))
    assert no_hooks_left(model) and cache.logical_length == 0
    with model.hooks(fwd_hooks=from_source(source, positions=range(8))):  # row 1 (padded) reached position 7
        feed(model, input_ids, attention_mask)
    with pytest.raises(ValueError, match=r"no calls of 'blocks.1.hook_z'; record them in the source run \(it "
                                         r"recorded: blocks.0.hook_resid_post\)"):
        from_source(source, names=["blocks.1.hook_z"])
    with pytest.raises(ValueError, match=r"heads= cannot select on 'blocks.0.hook_resid_post'"):
        from_source(source, heads=1)
    with pytest.raises(ValueError, match=r"batch size 2; the target has 3"):
        model.run_with_hooks(torch.ones(3, 4, dtype=torch.long), fwd_hooks=from_source(source))


def test_one_row_source_broadcasts_to_every_target_row():
    model = hooked("gpt2")
    input_ids = torch.randint(65, 122, (1, 12), generator=torch.Generator().manual_seed(3))
    with model.record("blocks.1.hook_resid_post") as source:
        clean = feed(model, input_ids)[:, -1]
    corrupted_ids = torch.randint(65, 122, (3, 12), generator=torch.Generator().manual_seed(4))
    with model.hooks(fwd_hooks=from_source(source)):
        patched = feed(model, corrupted_ids, prefill=6)[:, -1]
    assert (patched - clean).abs().max().item() <= 1e-5


# -- sweeps --------------------------------------------------------------------------------------------
def sweep_inputs(model):
    clean_ids = torch.tensor([[66, 101, 108, 108, 111, 32, 116, 104, 101, 114, 101, 32, 119, 111]])
    corrupted_ids = clean_ids.clone()
    corrupted_ids[0, 4] = 97
    corrupted_ids[0, 9] = 97
    with torch.no_grad():
        top_two = model(clean_ids).logits[0, -1].topk(2).indices.tolist()
    return clean_ids, corrupted_ids, logit_diff(*top_two)


@pytest.mark.parametrize("family", ["llama", "bloom"])
def test_sweep_over_last_layer_positions_finds_the_clean_metric_at_the_last_position(family):
    model = hooked(family)
    clean_ids, corrupted_ids, metric = sweep_inputs(model)
    last = model.num_layers - 1
    result = sweep(model, clean_ids, corrupted_ids, metric, over="layer_position", hook="hook_resid_post",
                   progress=False)
    assert result.patched.shape == (model.num_layers, 14) and result.slots == list(range(14))
    assert abs(result.clean - result.corrupted) > 0.1
    assert abs(result.patched[last, -1].item() - result.clean) <= 1e-5
    assert (result.patched[last, :-1] - result.corrupted).abs().max().item() <= 1e-5
    assert abs(result.normalized()[last, -1].item() - 1.0) <= 1e-4
    # All positions at once from the same clean source: the clean metric.
    with model.record(f"blocks.{last}.hook_resid_post") as source:
        feed(model, clean_ids)
    with model.hooks(fwd_hooks=from_source(source)):
        assert abs(metric(feed(model, corrupted_ids)).item() - result.clean) <= 1e-5
    assert no_hooks_left(model)


def test_sweep_entry_equals_a_hand_computed_single_patch():
    model = hooked("gpt_neox")
    clean_ids, corrupted_ids, metric = sweep_inputs(model)
    result = sweep(model, clean_ids, corrupted_ids, metric, over="layer_position", progress=False)
    _, clean_cache = model.run_with_cache(clean_ids, names_filter="blocks.1.hook_resid_pre")
    clean_resid = clean_cache["blocks.1.hook_resid_pre"]

    def patch_position_4(activation, hook):
        patched = activation.clone()
        patched[:, 4] = clean_resid[:, 4]
        return patched

    with torch.no_grad():
        by_hand = metric(model.run_with_hooks(corrupted_ids, fwd_hooks=[("blocks.1.hook_resid_pre", patch_position_4)]
                                              ).logits).item()
    assert result.patched[1, 4].item() == pytest.approx(by_hand, abs=1e-6)
    assert abs(result.patched[1, 4].item() - result.corrupted) > 1e-3  # position 4 was corrupted
    assert abs(result.patched[1, 3].item() - result.corrupted) <= 1e-6  # position 3 was not


def test_sweep_over_heads_in_cached_decode_steps():
    model = hooked("llama")
    clean_ids, corrupted_ids, metric = sweep_inputs(model)
    prefill, steps = 8, range(3, 7)  # forwards 3..6 feed positions 10..13
    result = sweep(model, clean_ids, corrupted_ids, metric, over="layer_head", prefill=prefill, steps=steps,
                   progress=False)
    assert result.patched.shape == (2, 4) and result.hook == "attn.hook_z"
    with model.record("blocks.0.attn.hook_z") as source:
        feed(model, clean_ids, prefill=prefill)
    with model.hooks(fwd_hooks=from_source(source, heads=2, steps=steps)):
        by_hand = metric(feed(model, corrupted_ids, prefill=prefill)).item()
    assert result.patched[0, 2].item() == by_hand
    assert abs(result.clean - metric(feed(model, clean_ids)).item()) <= 1e-5


def test_sweep_progress_bar_and_its_silence(capsys):
    model = hooked("gpt2")
    clean_ids, corrupted_ids, metric = sweep_inputs(model)
    sweep(model, clean_ids, corrupted_ids, metric, layers=[1], progress=False)
    assert capsys.readouterr().err == ""
    sweep(model, clean_ids, corrupted_ids, metric, layers=[1], progress=True)
    assert "sweep attn.hook_z over layer_head" in capsys.readouterr().err


def test_sweep_errors_and_hook_removal_when_the_metric_raises():
    model = hooked("gpt2")
    clean_ids, corrupted_ids, metric = sweep_inputs(model)
    with pytest.raises(ValueError, match="over must be one of 'layer_head', 'layer_position'"):
        sweep(model, clean_ids, corrupted_ids, metric, over="head")
    with pytest.raises(ValueError, match=r"same shape, so that absolute positions align"):
        sweep(model, clean_ids, corrupted_ids[:, :-1], metric)
    with pytest.raises(ValueError, match=r"has no hook 'blocks.0.attn.hook_rot_q'"):
        sweep(model, clean_ids, corrupted_ids, metric, hook="attn.hook_rot_q")
    with pytest.raises(ValueError, match=r"over='layer_head' needs a hook with a head axis; 'hook_resid_pre'"):
        sweep(model, clean_ids, corrupted_ids, metric, hook="hook_resid_pre")
    with pytest.raises(ValueError, match=r"metric must return a scalar; it returned shape \(1, 260\)"):
        sweep(model, clean_ids, corrupted_ids, lambda logits: logits[:, -1], progress=False)

    def fails(logits):  # first called on the clean run, while the recording hooks are attached
        raise RuntimeError("metric failed")

    with pytest.raises(RuntimeError, match="metric failed"):
        sweep(model, clean_ids, corrupted_ids, fails, progress=False)
    assert no_hooks_left(model) and model.context is None
