"""Recording: stitched full-sequence tensors, memory bound, save/load, and the ways a recording is made."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import hooked, padded_batch

from interp_cache.analysis.memory import generation_forward_lengths, recording_bytes_bound
from interp_cache.analysis.recording import RecordedCall, Recording, RecordingError
from interp_cache.analysis.recording_files import MANIFEST_FILE, TENSORS_FILE, RecordingFileError
from interp_cache.core.hook_layout import HookKind, HookLayout
from interp_cache.core.hook_points import token_layout
from interp_cache.compress import H2O
from interp_cache.decoding import Stepper

PATTERNS_AND_RESIDUALS = lambda name: name.endswith(("hook_pattern", "hook_resid_post"))


def hand_made(name: str, layout: HookLayout, calls: list[RecordedCall]) -> Recording:
    """A recording of one layer-0 hook, built by hand with the layout its hook point would declare."""
    recording = Recording()
    recording.order, recording.calls[name] = [name], calls
    recording.layouts[name], recording.layers[name] = layout, 0
    return recording


def pattern_layout(heads: int) -> HookLayout:
    return HookLayout.of(HookKind.KEYED, batch=None, head=heads, token=None, entry=None)


def assert_equal_where_defined(got: torch.Tensor, expected: torch.Tensor, atol: float, name: str) -> None:
    """Same shape, same NaN set, and max |got - expected| <= atol * max(1, max |expected|) elsewhere."""
    assert got.shape == expected.shape, name
    assert torch.equal(got.isnan(), expected.isnan()), f"{name}: the never-attended (NaN) entries differ"
    defined = ~expected.isnan()
    assert defined.any(), name
    scale = max(1.0, expected[defined].abs().max().item())
    error = (got[defined] - expected[defined]).abs().max().item()
    assert error <= atol * scale, f"{name}: max abs diff {error:.3g} > {atol} * {scale:.3g}"


def uncached_reference(model, token_ids: torch.Tensor, attention_mask: torch.Tensor, names) -> Recording:
    with torch.no_grad(), model.record(names) as reference:
        model(token_ids, attention_mask=attention_mask)
    return reference


def assert_stitched_equals_reference(recording: Recording, reference: Recording, num_layers: int) -> None:
    assert sorted(recording.names()) == sorted(reference.names())
    for name in recording.names():
        assert_equal_where_defined(recording.stacked(name), reference.stacked(name), 1e-5, name)
    assert sum(name.endswith("hook_pattern") for name in recording.names()) == num_layers


# -- stitching -----------------------------------------------------------------------------------------
def test_stitched_generation_equals_one_uncached_forward(family):
    model = hooked(family)
    input_ids, attention_mask = padded_batch(model)
    with model.record(PATTERNS_AND_RESIDUALS) as recording:
        generated = model.generate(input_ids, attention_mask=attention_mask, max_new_tokens=6, do_sample=False)
    new = generated.shape[1] - input_ids.shape[1]
    full_mask = torch.cat([attention_mask, torch.ones(2, new, dtype=attention_mask.dtype)], dim=1)
    # generate chooses its last token without feeding it: the reference runs over the slots it fed.
    reference = uncached_reference(model, generated[:, :-1], full_mask[:, :-1], PATTERNS_AND_RESIDUALS)
    assert [call.step for call in recording["blocks.0.attn.hook_pattern"]] == list(range(new))
    assert_stitched_equals_reference(recording, reference, model.num_layers)
    pattern = recording.stacked(f"blocks.{model.num_layers - 1}.attn.hook_pattern")
    real_tokens = full_mask[:, :-1].sum(-1)
    assert pattern.shape[-1] == int(real_tokens.max())  # T = longest row's real tokens (positions start at 0)
    short_row = int(real_tokens.argmin())
    assert pattern[short_row, :, int(real_tokens.min()):].isnan().all()  # positions the short row never reached
    future = torch.ones(pattern.shape[-2:]).triu(diagonal=1).bool()
    assert pattern[:, :, future].isnan().all()


def test_stepper_and_chunked_prefill_stitch_to_the_uncached_forward(family):
    model = hooked(family)
    input_ids, attention_mask = padded_batch(model)
    half = input_ids.shape[1] // 2  # the padded row's first chunk is all padding
    patterns = lambda name: name.endswith("hook_pattern")
    stitched, fed = [], []
    for chunks in ((input_ids.shape[1],), (half, input_ids.shape[1] - half)):
        stepper = Stepper(model)
        with model.record(patterns) as recording:
            for chunk_ids, chunk_mask in zip(input_ids.split(chunks, dim=1), attention_mask.split(chunks, dim=1)):
                logits = stepper.prefill(chunk_ids, chunk_mask)[:, -1]
            stepper.greedy(logits, 5)
        assert [call.step for call in recording["blocks.0.attn.hook_pattern"]] == list(range(len(chunks) + 5))
        stitched.append({name: recording.stacked(name) for name in recording.names()})
        fed.append((stepper.token_ids, stepper.attention_mask))
    assert torch.equal(fed[0][0], fed[1][0])
    reference = uncached_reference(model, *fed[0], patterns)
    assert len(stitched[0]) == len(stitched[1]) == model.num_layers
    for name in reference.names():
        expected = reference.stacked(name)
        for whole_or_chunked in stitched:
            assert_equal_where_defined(whole_or_chunked[name], expected, 1e-5, name)


@pytest.mark.parametrize("policy", ["streaming_llm", "quest"])
def test_compressed_generation_leaves_evicted_and_unselected_entries_nan(policy):
    """Every defined query row carries all its attention mass: the NaN entries are exactly the unread ones."""
    from interp_cache.compress import Quest, StreamingLLM

    compress = StreamingLLM(sink=2, window=10) if policy == "streaming_llm" else Quest(budget=16, page_size=4,
                                                                                      dense_layers=1)
    model = hooked("llama")
    input_ids, attention_mask = padded_batch(model)
    with model.record("blocks.1.attn.hook_pattern") as recording:
        model.generate(input_ids, attention_mask=attention_mask, max_new_tokens=6, do_sample=False, compress=compress)
    pattern = recording.stacked("blocks.1.attn.hook_pattern")
    queries = ~pattern.isnan().all(-1)  # [b, h, T]: positions that were a query
    row_sums = pattern.nan_to_num(0.0).sum(-1)[queries]
    assert (row_sums - 1).abs().max().item() <= 1e-5
    last = pattern[0, :, -1]  # the unpadded row's last decode step
    read = (~last.isnan()).sum(-1)
    assert (read <= 16).all() and (read < pattern.shape[-1] // 2).all()
    assert not last[:, -1].isnan().any()  # a token always reads its own entry


def test_keyed_stacking_places_entries_by_true_key_position_per_head():
    """Head-wise eviction (KV head 0 lost position 1, a -1 hole at the end) and GQA (2 query heads per KV head)."""
    torch.manual_seed(0)
    prefill = torch.rand(1, 4, 3, 3)
    decode = torch.rand(1, 4, 1, 4)
    recording = hand_made("blocks.0.attn.hook_pattern", pattern_layout(4), [
        RecordedCall(0, torch.tensor([[0, 1, 2]]), torch.zeros(1, 3, dtype=torch.bool),
                     torch.tensor([[[0, 1, 2], [0, 1, 2]]]), prefill),
        RecordedCall(1, torch.tensor([[3]]), torch.zeros(1, 1, dtype=torch.bool),
                     torch.tensor([[[0, 2, 3, -1], [0, 1, 2, 3]]]), decode),
    ])
    expected = torch.full((1, 4, 4, 4), float("nan"))
    causal = torch.ones(3, 3).tril().bool()
    expected[0, :, :3, :3] = torch.where(causal, prefill[0], float("nan"))
    expected[0, :2, 3, [0, 2, 3]] = decode[0, :2, 0, :3]  # KV head 0: entries at positions 0, 2, 3, then a hole
    expected[0, 2:, 3, :] = decode[0, 2:, 0, :]
    torch.testing.assert_close(recording.stacked("blocks.0.attn.hook_pattern"), expected, rtol=0, atol=0,
                               equal_nan=True)


def test_a_cache_entry_read_twice_is_reported_not_stitched():
    recording = hand_made("blocks.0.attn.hook_pattern", pattern_layout(2), [
        RecordedCall(0, torch.tensor([[2]]), torch.zeros(1, 1, dtype=torch.bool), torch.tensor([[[0, 1, 1, 2]]]),
                     torch.rand(1, 2, 1, 4)),
    ])
    with pytest.raises(ValueError, match="step 0: row 0 head 0: the query at position 2 read two cache entries at "
                                         "key position 1; the cache holds one position twice"):
        recording.stacked("blocks.0.attn.hook_pattern")


def test_sliding_window_zeros_stay_zero_and_only_the_future_is_nan():
    model = hooked("mistral")  # sliding window 12, prompts of 43 slots
    input_ids, attention_mask = padded_batch(model)
    with model.record("blocks.0.attn.hook_pattern") as recording:
        model.generate(input_ids, attention_mask=attention_mask, max_new_tokens=3, do_sample=False)
    pattern = recording.stacked("blocks.0.attn.hook_pattern")[0]  # the unpadded row: [h, T, T]
    query, key = torch.meshgrid(torch.arange(pattern.shape[-1]), torch.arange(pattern.shape[-1]), indexing="ij")
    assert pattern[:, query < key].isnan().all()
    assert torch.equal(pattern[:, query - key >= 12], torch.zeros_like(pattern[:, query - key >= 12]))
    assert not pattern[:, (query >= key) & (query - key < 12)].isnan().any()


def test_per_token_stacking_aligns_by_position_and_integers_fill_minus_one():
    model = hooked("llama")
    input_ids, attention_mask = padded_batch(model)
    with model.record(["hook_position_ids", "blocks.0.cache.hook_k_write"]) as recording:
        model.generate(input_ids, attention_mask=attention_mask, max_new_tokens=4, do_sample=False)
    positions = recording.stacked("hook_position_ids")
    real = attention_mask.sum(-1) + 3
    assert positions.shape == (2, int(real.max()))
    for row in range(2):
        assert torch.equal(positions[row, : real[row]], torch.arange(int(real[row])))
        assert (positions[row, real[row]:] == -1).all()
    keys_bgtd = recording.stacked("blocks.0.cache.hook_k_write")
    assert keys_bgtd.shape[:3] == (2, 2, int(real.max()))
    first_decode = recording["blocks.0.cache.hook_k_write"][1]
    assert torch.equal(keys_bgtd[1, :, int(real[1]) - 3], first_decode.activation[1, :, 0])


@pytest.mark.parametrize("name", ["blocks.0.cache.hook_k_read", "blocks.0.cache.hook_positions"])
def test_entry_hooks_cannot_be_stacked(name):
    model = hooked("gpt2")
    input_ids, attention_mask = padded_batch(model)
    with torch.no_grad(), model.record(name) as recording:
        model(input_ids, attention_mask=attention_mask)
    with pytest.raises(ValueError, match=rf"{name}.*cache-entry hook.*accepts per-token hooks.*hook_pattern"):
        recording.stacked(name)
    with pytest.raises(KeyError, match="no calls of 'blocks.0.hook_z' were recorded"):
        recording.stacked("blocks.0.hook_z")


def test_unknown_hook_names_are_an_error_not_an_empty_recording():
    model = hooked("gpt2")
    with pytest.raises(ValueError, match=r"no hook point named 'blocks.0.attn.hook_rot_q' in this gpt2 model"):
        model.record(["blocks.0.attn.hook_rot_q", "blocks.0.attn.hook_q"]).__enter__()
    with pytest.raises(ValueError, match="no hook point named 'blocks.9.hook_resid_post'"):
        recording_bytes_bound(model, 1, [3], names_filter="blocks.9.hook_resid_post")


def test_two_passes_over_one_position_are_refused():
    model = hooked("gpt2")
    input_ids, attention_mask = padded_batch(model)
    with torch.no_grad(), model.record("blocks.0.hook_resid_post") as recording:
        model(input_ids, attention_mask=attention_mask)
        model(input_ids, attention_mask=attention_mask)
    with pytest.raises(ValueError, match="row 0 position 0 was recorded more than once"):
        recording.stacked("blocks.0.hook_resid_post")


# -- what the recording keeps ----------------------------------------------------------------------------
def test_recorded_tensors_are_copies_the_cache_cannot_change():
    """Rewind rewrites the cache's position storage in place; the recording keeps what the hooks saw."""
    model = hooked("llama")
    input_ids, attention_mask = padded_batch(model)
    stepper = Stepper(model)
    logits = stepper.prefill(input_ids, attention_mask)[:, -1]
    with model.record(["blocks.0.cache.hook_positions", "blocks.0.cache.hook_k_read"]) as recording:
        stepper.step(logits.argmax(-1))
        seen = [call.activation.clone() for call in recording["blocks.0.cache.hook_positions"]]
        stepper.rewind(1)
        stepper.step(torch.tensor([65, 66]))
    first = recording["blocks.0.cache.hook_positions"][0]
    assert torch.equal(first.activation, seen[0]) and (first.activation[0] >= 0).all()
    assert first.key_positions is first.activation  # equal metadata is stored once per step
    assert [call.step for call in recording["blocks.0.cache.hook_k_read"]] == [1, 1]


@pytest.mark.parametrize("family", ["llama", "bloom"])
def test_recording_equals_a_hook_that_clones_everything_bitwise_through_eviction_and_rewind(family):
    """Recording keeps metadata by identity within a forward; what it keeps is exactly what a hook that
    clones every tensor of every call sees -- through H2O evicting at every step and a forked branch that
    decodes the same step numbers on its own cache before the trunk goes on."""
    model = hooked(family)
    ids, mask = padded_batch(model)
    cloned: dict[str, list[tuple]] = {}

    def clone_everything(activation, hook):
        key_positions = None if hook.key_positions is None else hook.key_positions.clone()
        cloned.setdefault(hook.name, []).append(
            (hook.step, hook.positions.clone(), hook.is_padding.clone(), key_positions, activation.clone())
        )

    stepper = Stepper(model, compress=H2O(heavy=4, recent=4))
    with model.hooks(fwd_hooks=[(lambda name: True, clone_everything)]), model.record() as recording:
        token = stepper.prefill(ids, mask)[:, -1].argmax(-1)
        stepper.step(token)
        branch = stepper.fork()
        for _ in range(3):
            token = branch.step(token).argmax(-1)
        stepper.step(token)
    assert sorted(recording.names()) == sorted(cloned)
    for name, calls in cloned.items():
        assert len(recording[name]) == len(calls), name
        for call, (step, positions, is_padding, key_positions, activation) in zip(recording[name], calls):
            assert call.step == step
            assert torch.equal(call.positions, positions) and torch.equal(call.is_padding, is_padding), name
            assert (call.key_positions is None) == (key_positions is None), name
            assert key_positions is None or torch.equal(call.key_positions, key_positions), name
            assert torch.equal(call.activation, activation), name


def test_a_pattern_edited_in_place_after_the_recording_saw_it_raises_llama():
    """Patterns are kept by reference: an in-place edit by a hook attached after the recording started is
    refused, naming the hook; attached before, the recording holds the edited pattern."""
    model = hooked("llama")
    ids, mask = padded_batch(model)
    name = "blocks.1.attn.hook_pattern"

    def zero_head_in_place(pattern, hook):
        pattern[:, 0] = 0.0
        return pattern

    with pytest.raises(RecordingError, match=f"'{name}' was written in place after the recording saw it"):
        with model.record(name), model.hooks(fwd_hooks=[(name, zero_head_in_place)]):
            model(ids, attention_mask=mask)
    assert not model.blocks[1].attn.hook_pattern.is_hooked()
    with model.hooks(fwd_hooks=[(name, zero_head_in_place)]), model.record(name) as recording:
        model(ids, attention_mask=mask)
    pattern = recording[name][0].activation
    assert torch.equal(pattern[:, 0], torch.zeros_like(pattern[:, 0])) and pattern[:, 1].sum() > 0


def test_recording_bytes_stay_within_the_documented_bound():
    """Everything recorded for 128 new tokens on the zoo llama: bytes counted, bound at most 10% above."""
    model = hooked("llama")
    input_ids, attention_mask = padded_batch(model, ["Hi"])
    with model.record() as recording:
        model.generate(input_ids, attention_mask=attention_mask, max_new_tokens=128, do_sample=False,
                       eos_token_id=None)
    assert len(recording["blocks.0.attn.hook_pattern"]) == 128
    bound = recording_bytes_bound(model, 1, generation_forward_lengths(input_ids.shape[1], 128))
    assert recording.nbytes <= bound <= 1.10 * recording.nbytes, (recording.nbytes, bound)
    pattern_bytes = sum(call.activation.nbytes for call in recording["blocks.0.attn.hook_pattern"])
    # float32 * h * sum_s p_s * k_s: a prefill of 2 slots, then single tokens reading 3 .. 129 entries
    assert pattern_bytes == 4 * model.runners[0].spec.num_heads * (2 * 2 + sum(range(3, 130)))
    assert recording_bytes_bound(model, 1, [2, 1], names_filter="blocks.0.attn.hook_z") == 3 * (8 + 1) + 3 * 64 * 4


def test_bytes_bound_holds_for_a_padded_bfloat16_recording(family):
    model = hooked(family)
    input_ids, attention_mask = padded_batch(model)
    with model.record(dtype=torch.bfloat16) as recording:
        model.generate(input_ids, attention_mask=attention_mask, max_new_tokens=8, do_sample=False, eos_token_id=None)
    bound = recording_bytes_bound(model, 2, generation_forward_lengths(input_ids.shape[1], 8), dtype=torch.bfloat16)
    assert recording.nbytes <= bound <= 1.10 * recording.nbytes, (recording.nbytes, bound)
    assert generation_forward_lengths(5, 0) == [] and generation_forward_lengths(5, 3) == [5, 1, 1]


# -- files -----------------------------------------------------------------------------------------------
def _short_recording(dtype: torch.dtype | None) -> Recording:
    model = hooked("bloom")
    input_ids, attention_mask = padded_batch(model)
    with model.record(dtype=dtype) as recording:
        model.generate(input_ids, attention_mask=attention_mask, max_new_tokens=2, do_sample=False)
    return recording


@pytest.mark.parametrize("dtype", [None, torch.bfloat16])
def test_save_load_round_trip_is_bitwise(tmp_path, dtype):
    recording = _short_recording(dtype)
    recording.save(tmp_path / "rec")
    loaded = Recording.load(tmp_path / "rec")
    assert loaded.names() == recording.names()
    assert loaded.dtype == dtype and loaded.nbytes == recording.nbytes
    for name in recording.names():
        assert len(loaded[name]) == len(recording[name])
        for original, restored in zip(recording[name], loaded[name]):
            assert original.step == restored.step
            for field in ("positions", "is_padding", "key_positions", "activation"):
                a, b = getattr(original, field), getattr(restored, field)
                assert (a is None) == (b is None), (name, field)
                assert a is None or (a.dtype == b.dtype and torch.equal(a, b)), (name, field)
    assert recording["hook_embed"][0].key_positions is None
    assert loaded["blocks.0.attn.hook_pattern"][0].activation.dtype == (dtype or torch.float32)
    assert torch.equal(loaded.stacked("blocks.1.attn.hook_pos_bias").isnan(),
                       recording.stacked("blocks.1.attn.hook_pos_bias").isnan())


def _truncate(directory):
    path = directory / TENSORS_FILE
    path.write_bytes(path.read_bytes()[:-100])


def _flip_a_byte(directory):
    path = directory / TENSORS_FILE
    data = bytearray(path.read_bytes())
    data[-7] ^= 0x01
    path.write_bytes(bytes(data))


def _edit_manifest(edit):
    def apply(directory):
        path = directory / MANIFEST_FILE
        manifest = json.loads(path.read_text())
        edit(manifest)
        path.write_text(json.dumps(manifest))
    return apply


def _wrong_shape(manifest):
    manifest["tensors"]["t0"]["shape"][-1] += 1


def _missing_tensor_key(manifest):
    del manifest["tensors"]["t1"]


def _call_without_activation(manifest):
    del manifest["calls"][manifest["order"][0]][0]["activation"]


def _future_version(manifest):
    manifest["version"] = 3


@pytest.mark.parametrize("damage, file, message", [
    (_truncate, TENSORS_FILE, "truncated"),
    (_flip_a_byte, TENSORS_FILE, "corrupted"),
    (lambda d: (d / TENSORS_FILE).unlink(), TENSORS_FILE, "missing"),
    (lambda d: (d / MANIFEST_FILE).unlink(), MANIFEST_FILE, "missing"),
    (lambda d: (d / MANIFEST_FILE).write_text("{not json"), MANIFEST_FILE, "not a readable JSON manifest"),
    (_edit_manifest(_wrong_shape), TENSORS_FILE, r"tensor 't0' is .* records"),
    (_edit_manifest(_missing_tensor_key), TENSORS_FILE, r"does not match .*not in the manifest \['t1'\]"),
    (_edit_manifest(_call_without_activation), MANIFEST_FILE, "field 'activation' is missing"),
    (_edit_manifest(_future_version), MANIFEST_FILE, "format version 3; this interp_cache reads version 2"),
])
def test_damaged_files_raise_a_clear_error(tmp_path, damage, file, message):
    recording = hand_made("blocks.0.hook_resid_post", token_layout(8), [
        RecordedCall(0, torch.arange(4)[None], torch.zeros(1, 4, dtype=torch.bool), None, torch.randn(1, 4, 8))
    ])
    directory = tmp_path / "rec"
    recording.save(directory)
    damage(directory)
    with pytest.raises(RecordingFileError, match=rf"{file}.*{message}"):
        Recording.load(directory)


def test_loading_a_missing_directory_names_it(tmp_path):
    with pytest.raises(RecordingFileError, match=r"nowhere: no recording here"):
        Recording.load(tmp_path / "nowhere")


# -- the ways a recording is made --------------------------------------------------------------------------
def test_recording_inside_run_with_cache():
    model = hooked("llama")
    input_ids, attention_mask = padded_batch(model)
    name = "blocks.1.attn.hook_pattern"
    with model.record([name, "blocks.0.hook_resid_post"]) as recording:
        _, cache = model.run_with_cache(input_ids, attention_mask=attention_mask, names_filter=name)
    assert torch.equal(recording[name][0].activation, cache[name])
    assert "blocks.0.hook_resid_post" in recording
    assert all(not point._forward_hooks for point in model.hook_dict.values())


def test_recording_a_stepper_sees_each_step_and_its_positions():
    model = hooked("gpt2")
    input_ids, attention_mask = padded_batch(model)
    stepper = Stepper(model)
    with model.record("blocks.0.hook_resid_post") as recording:
        logits = stepper.prefill(input_ids, attention_mask)[:, -1]
        stepper.greedy(logits, 3)
    calls = recording["blocks.0.hook_resid_post"]
    assert [call.step for call in calls] == [0, 1, 2, 3]
    real = attention_mask.sum(-1)
    assert torch.equal(calls[3].positions[:, 0], real + 2)
    assert calls[0].is_padding.sum() == (attention_mask == 0).sum()


def test_a_run_that_raises_leaves_a_partial_recording_of_the_completed_steps_llama(tmp_path):
    model = hooked("llama")
    ids, mask = padded_batch(model)

    def fail_at_step_3(activation, hook):
        if hook.step == 3:
            raise RuntimeError("boom at step 3")

    names = ["blocks.0.attn.hook_z", "blocks.1.attn.hook_z"]
    with pytest.raises(RuntimeError, match="boom"):
        with model.record(names) as rec:
            with model.hooks(fwd_hooks=[("blocks.1.attn.hook_q", fail_at_step_3)]):
                model.generate(ids, attention_mask=mask, max_new_tokens=6, do_sample=False)
    assert rec.partial and "RuntimeError: boom at step 3" in rec.interrupted_by
    for name in names:  # steps 0-2 completed; step 3's layer-0 call (made before the error) is dropped
        assert [call.step for call in rec[name]] == [0, 1, 2]
    assert "partial: steps <= 2 kept" in repr(rec)
    rec.save(tmp_path / "r")
    loaded = Recording.load(tmp_path / "r")
    assert loaded.partial and loaded.interrupted_by == rec.interrupted_by
    with model.record(names) as complete:
        model(ids, attention_mask=mask)
    assert not complete.partial and complete.interrupted_by is None
