"""A user's decode loop on a plain transformers model -- their model, cache class and attention -- checked
against the model's own uncached forward and localized to the first (step, layer) that departs.

The loop runs under a `ModuleProbe` (module hooks only); the reference is one uncached forward over every
token slot the loop fed, called as `generate` calls the model (padding-aware position ids). Forward `s` of
the loop covers the slots after those of forwards `0..s-1`. At each step, layer by layer, the attention
module's output and then the layer's output are compared with the reference's at the same slots over real
tokens; the first above `tolerance * max(1, max |reference|)` is the departure. Positions are integers and
compare exactly: a row whose positions are not the true ones plus one constant shift over the whole run
(which relative schemes cannot see) fails even when the floats stay within tolerance.
"""

from __future__ import annotations

import torch

from interp_cache.verify.module_probe import ForwardCall, ModuleProbe
from interp_cache.verify.report import Divergence, VerifyReport, compare
from interp_cache.verify.runs import aligned_logits, extend_mask, original_logits, padding_aware_position_ids


def verify_plain_decode_loop(model, loop_fn, input_ids, attention_mask, max_new_tokens: int,
                             tolerance: float) -> VerifyReport:
    with torch.no_grad(), ModuleProbe(model) as probe:
        loop_fn(model, input_ids, attention_mask, max_new_tokens)
    calls = probe.calls
    if not calls:
        raise ValueError("the decode loop never called the model")
    fed = torch.cat([call.input_ids for call in calls], dim=1)
    prompt_length = input_ids.shape[1]
    refeeds = [call for call in calls[1:] if call.new_tokens >= prompt_length
               and torch.equal(call.input_ids[:, :prompt_length], input_ids)]
    if refeeds or fed.shape[1] < prompt_length or not torch.equal(fed[:, :prompt_length], input_ids):
        raise ValueError("the loop's forwards did not begin with the prompt: verify_decode_loop aligns forwards "
                         "by token slot and needs a loop that feeds each slot once, in order (the prompt, "
                         "whole or in chunks, then one new token per step), as cached decoding does")
    fed_mask = extend_mask(attention_mask, fed.shape[1])
    with torch.no_grad(), ModuleProbe(model) as reference_probe:
        expected = original_logits(model, fed, fed_mask)
    reference = reference_probe.calls[0]

    got, scored = aligned_logits([(call.new_tokens, call.logits) for call in calls], fed.shape[1])
    row = compare("decode_loop", got, expected, fed_mask.bool() & scored, tolerance)
    true_positions = padding_aware_position_ids(fed_mask)
    departure = _first_departure(probe, calls, reference, fed_mask, true_positions, tolerance)
    wrong_positions = _first_position_error(calls, fed_mask, true_positions)
    found = departure or wrong_positions
    if found is not None:
        row.passed = False
        row.first_divergence = found
        row.note = _explain(found, wrong_positions)
    report = VerifyReport(f"{model.config.model_type} decode loop (plain transformers)",
                          str(model.dtype).replace("torch.", ""))
    report.rows.append(row)
    return report


def _slots(calls: list[ForwardCall]):
    slot = 0
    for step, call in enumerate(calls):
        yield step, call, slot
        slot += call.new_tokens


def _loop_inputs(call: ForwardCall, slot: int, row: int, true_positions: torch.Tensor) -> dict:
    """What the loop passed at this step for batch row `row`, next to what was expected."""
    used = call.positions_used()
    return {
        "position_ids": None if used is None else used[min(row, used.shape[0] - 1)].tolist(),
        "expected_position_ids": true_positions[row, slot : slot + call.new_tokens].tolist(),
        "cache_length": call.reported_cache_length,
        "expected_cache_length": slot,
        "mask_length": call.mask_length,
        "expected_mask_length": slot + call.new_tokens,
    }


def _first_departure(probe, calls, reference: ForwardCall, fed_mask, true_positions, tolerance):
    for step, call, slot in _slots(calls):
        n = call.new_tokens
        real_bt = fed_mask[:, slot : slot + n].bool()
        compared = zip(probe.attention_names, call.attention_outputs, reference.attention_outputs,
                       probe.layer_names, call.layer_outputs, reference.layer_outputs)
        for layer, (attn_name, attn_got, attn_ref, layer_name, out_got, out_ref) in enumerate(compared):
            for name, got_btd, ref_btd in ((attn_name, attn_got, attn_ref), (layer_name, out_got, out_ref)):
                ref_btd = ref_btd[:, slot : slot + n]
                if got_btd.shape != ref_btd.shape:
                    return Divergence(name, layer, None, step, None, float("inf"), 0,
                                      _loop_inputs(call, slot, 0, true_positions))
                error_bt = (got_btd.float() - ref_btd.float()).abs().amax(-1).masked_fill(~real_bt, 0.0)
                scale = ref_btd.float().abs().amax(-1).masked_fill(~real_bt, 0.0).max().item()
                if error_bt.max().item() > tolerance * max(1.0, scale):
                    row, token = (int(i) for i in torch.unravel_index(error_bt.argmax(), error_bt.shape))
                    return Divergence(name, layer, None, step, int(true_positions[row, slot + token]),
                                      error_bt[row, token].item(), row, _loop_inputs(call, slot, row, true_positions))
    return None


def _first_position_error(calls, fed_mask, true_positions):
    """The first step where a row's positions stop being its true positions plus the row's first shift."""
    shift_of_row: dict[int, int] = {}
    for step, call, slot in _slots(calls):
        used = call.positions_used()
        if used is None:
            continue
        used_bt = used.expand(fed_mask.shape[0], -1)
        real_bt = fed_mask[:, slot : slot + call.new_tokens].bool()
        shift_bt = used_bt - true_positions[:, slot : slot + call.new_tokens]
        for row, token in real_bt.nonzero().tolist():
            shift = int(shift_bt[row, token])
            if shift_of_row.setdefault(row, shift) != shift:
                return Divergence("position_ids", None, None, step, int(true_positions[row, slot + token]),
                                  float(abs(shift - shift_of_row[row])), row,
                                  _loop_inputs(call, slot, row, true_positions))
    return None


def _explain(found: Divergence, wrong_positions: Divergence | None) -> str:
    given = found.loop_inputs
    where = ("positions" if found.hook == "position_ids" else f"layer {found.layer} ({found.hook})")
    text = (f"step {found.step}: {where} departs first, row {found.row}, position {found.position}, "
            f"|diff| {found.error:.2e}; position ids used {_short(given['position_ids'])} "
            f"(true {_short(given['expected_position_ids'])}), its cache reported length {given['cache_length']} "
            f"(true {given['expected_cache_length']}), mask length {given['mask_length']} "
            f"(true {given['expected_mask_length']})")
    if wrong_positions is not None and wrong_positions is not found:
        text += f"; positions are wrong from step {wrong_positions.step} (row {wrong_positions.row})"
    return text


def _short(values) -> str:
    if values is None:
        return "none"
    return str(values) if len(values) <= 6 else f"[{values[0]}, {values[1]}, ..., {values[-1]}] ({len(values)})"
