"""Where do two runs of the same tokens first differ? Hook by hook, step by step.

The reference is one uncached forward over every token slot the run under test fed. The run under test
(cached steps, chunked prefill, `generate`, a user's decode loop) fed the same slots over several
forwards. Each hook call of the test run is aligned with the reference by token slot -- its new tokens
are the next slots of the sequence, the cache entries it read are the first slots -- and compared over
real (non-padding) tokens and entries. The first divergence is the earliest decode step, and within it
the first hook in model order, whose error exceeds `tolerance * max(1, max |reference|)` -- or, for hooks
whose values are positions or indices (their layout's integer dtype), that differs at all.
"""

from __future__ import annotations

import torch

from interp_cache.analysis.recording import RecordedCall, Recording
from interp_cache.core.hook_layout import HookKind, HookLayout
from interp_cache.verify.report import Divergence


def _masked_floor(tensor: torch.Tensor) -> torch.Tensor:
    return tensor <= torch.finfo(torch.float32).min / 2


def _divergence_in_call(
    name: str, layout: HookLayout, layer: int | None, call: RecordedCall, reference: RecordedCall, slot: int,
    tolerance: float,
):
    keyed = layout.kind is HookKind.KEYED
    axis = layout.token_axis
    got = call.activation.float()
    ref = reference.activation.float()
    p = call.positions.shape[1]
    if axis is not None:
        ref = ref.narrow(axis, slot, p)
        if keyed:
            ref = ref[..., : got.shape[-1]]
        valid = ~call.is_padding
        valid = valid.view(valid.shape[0], *([1] * (axis - 1)), p, *([1] * (got.ndim - axis - 1)))
        if keyed and reference.key_positions is not None:
            key_valid = reference.key_positions[:, :1, : got.shape[-1]] >= 0  # [b, 1, k]
            valid = valid & key_valid[:, :, None, :]
    else:
        k = got.shape[2]
        ref = ref[:, :, :k]
        if reference.key_positions is None:
            return None
        # Positions are compared everywhere: the -1 that marks a padding entry is itself the information.
        valid = reference.key_positions[:, :, :k] >= 0
        if layout.mirrors == "key_positions":
            valid = torch.ones_like(valid)
        if got.ndim == 4:
            valid = valid[..., None]
    if got.shape != ref.shape:
        return Divergence(name, layer, None, call.step, None, float("inf"))
    difference = (got - ref).abs()
    both_masked = _masked_floor(got) & _masked_floor(ref)
    valid = valid.expand_as(difference) & ~both_masked
    difference = difference.masked_fill(~valid, 0.0)
    error = difference.max().item()
    if layout.holds_integers:
        if error == 0:  # positions and indices are facts: equal, in every dtype, or wrong
            return None
    elif error <= tolerance * max(1.0, ref.masked_fill(~valid, 0.0).abs().max().item()):
        return None
    index = list(torch.unravel_index(difference.argmax(), difference.shape))
    row = int(index[0])
    head = None
    if layout.head_axis is not None and difference.ndim > layout.head_axis:
        head = int(index[layout.head_axis])
    if axis is not None:
        token = int(index[axis])
        position = int(reference.positions[row, slot + token])
    else:
        position = int(reference.key_positions[row, 0, int(index[2])])
    return Divergence(name, layer, head, call.step, position, error, row)


def first_divergence(test: Recording, reference: Recording, tolerance: float, integers_only: bool = False):
    """The earliest (step, model-order) hook call of `test` that differs from `reference`, or None.

    Float hooks differ when their error exceeds `tolerance * max(1, max |reference|)`; integer hooks
    (positions, indices) when they differ at all. `integers_only` compares integer hooks alone.
    """
    found = []
    for order, name in enumerate(reference.order):
        layout = reference.layouts[name]
        if name not in test or layout.kind is HookKind.POLICY or (integers_only and not layout.holds_integers):
            continue
        slot = 0
        for call in test[name]:
            divergence = _divergence_in_call(
                name, layout, reference.layers[name], call, reference[name][0], slot, tolerance)
            if divergence is not None:
                found.append((call.step, order, divergence))
                break
            slot += call.positions.shape[1]
    return min(found, key=lambda item: item[:2])[2] if found else None


def localize(model, run, fed_ids: torch.Tensor, fed_mask: torch.Tensor, tolerance: float):
    """Record `run()` and an uncached forward over `fed_ids`; return the first divergence (or None)."""
    with torch.no_grad():
        with model.record() as test:
            run()
        with model.record() as reference:
            model(fed_ids, attention_mask=fed_mask)
    return first_divergence(test, reference, tolerance)
