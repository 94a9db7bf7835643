"""Does cached decoding compute the same function as the uncached forward? One row per check.

`verify(model)` runs the model several ways on the same prompts and compares logits (or tokens):

1. `stepwise`       full forward vs prefill of one token + single-token cached steps
2. `chunked[n]`     full forward vs cached prefill in chunks of n tokens
3. `left_padding`   a left-padded batch vs each prompt alone
4. `generate`       greedy generate with cache vs without (tokens; first differing step)
5. `original[impl]` hooked model vs the original transformers model under each attention implementation
                    it offers; `upstream[a~b]` compares those implementations with each other. Upstream rows
                    describe transformers, not this wrapper: they are marked and do not fail the report
                    unless `strict_upstream=True`.
6. `noop_hooks`     a no-op hook on every hook point vs the same (explicit) path with no hooks: bitwise
7. `compression`    every compression policy at a budget >= the sequence length vs no policy: bitwise equal
                    logits at the prefill and every greedy decode step

When a cached-vs-uncached row fails, both runs are recorded at every hook point and aligned by token
slot and decode step; `first_divergence` names the first hook (layer, head, step, absolute position,
error) that differs beyond tolerance (`localize.py`). `verify_decode_loop` (`decode_loop.py`) does the
same for a user's own decode loop. Rows and their formatting are `report.py`.
"""

from __future__ import annotations

import torch

from interp_cache.compress import policy_classes
from interp_cache.decoding.stepper import Stepper
from interp_cache.verify.localize import localize
from interp_cache.verify.report import CheckRow, Divergence, VerifyReport, compare, skipped_row
from interp_cache.verify.runs import (
    ATTENTION_IMPLEMENTATIONS,
    CHUNK_SIZES,
    TOLERANCES,
    cached_in_chunks,
    extend_mask,
    original_logits,
    prompt_batch,
    row_alone,
    unwrapped_copy,
)


def verify(
    model,
    prompts=None,
    max_new_tokens: int = 16,
    strict_upstream: bool = False,
    name: str | None = None,
    *,
    attention_mask: torch.Tensor | None = None,
) -> VerifyReport:
    """Compare cached, chunked, left-padded, generated, original and compressed runs on `prompts`: a string,
    a list of strings, a BatchEncoding / dict, or input_ids with an optional `attention_mask` (left-padded);
    None: three default prompts."""
    tolerance = TOLERANCES.get(model.dtype)
    if tolerance is None:
        raise ValueError(f"verify has tolerances for {', '.join(map(str, TOLERANCES))}; the model is {model.dtype}")
    input_ids, attention_mask = prompt_batch(model, prompts, attention_mask)
    max_positions = getattr(model.config, "max_position_embeddings", None) or getattr(model.config, "n_positions", None)
    if max_positions is not None and input_ids.shape[1] + max_new_tokens > max_positions:
        raise ValueError(
            f"prompts of {input_ids.shape[1]} tokens + {max_new_tokens} new exceed the model's context "
            f"of {max_positions} positions"
        )
    real = attention_mask.bool()
    report = VerifyReport(name or model.family, str(model.dtype).replace("torch.", ""), strict_upstream=strict_upstream)
    rows = report.rows
    with torch.no_grad():
        full = model(input_ids, attention_mask=attention_mask).logits
        for check, chunk in [("stepwise", 1)] + [(f"chunked[{n}]", n) for n in CHUNK_SIZES]:
            row = compare(check, cached_in_chunks(model, input_ids, attention_mask, chunk), full, real,
                           tolerance["cache"])
            if not row.passed:
                row.first_divergence = localize(
                    model, lambda: cached_in_chunks(model, input_ids, attention_mask, chunk),
                    input_ids, attention_mask, tolerance["cache"],
                ) or row.first_divergence
            rows.append(row)

        worst = None
        for row_index in range(input_ids.shape[0]):
            alone_ids = row_alone(input_ids, attention_mask, row_index)
            alone = model(alone_ids).logits
            n = alone_ids.shape[1]
            row = compare("left_padding", full[row_index:row_index + 1, -n:], alone,
                           torch.ones(1, n, dtype=torch.bool, device=alone.device), tolerance["cache"])
            if worst is None or row.max_abs_err > worst.max_abs_err:
                worst = row
        rows.append(worst)

        rows.append(_generate_row(model, input_ids, attention_mask, max_new_tokens, tolerance["cache"]))
        rows.extend(_original_rows(model, input_ids, attention_mask, full, real, tolerance["original"]))
        rows.append(_noop_hooks_row(model, input_ids, attention_mask, full, real, tolerance["cache"]))
        rows.append(_compression_row(model, input_ids, attention_mask, max_new_tokens))
    return report


def _identity_policies(total_tokens: int) -> list:
    """Every registered policy with a budget that covers the whole sequence (Quest selects from layer 0 on)."""
    return [policy_class.covering(total_tokens) for policy_class in policy_classes()]


def _compression_row(model, input_ids, attention_mask, max_new_tokens) -> CheckRow:
    def greedy_logits(policy):
        stepper = Stepper(model, compress=policy)
        logits = [stepper.prefill(input_ids, attention_mask)]
        for _ in range(max_new_tokens):
            logits.append(stepper.step(logits[-1][:, -1].argmax(-1))[:, None])
        return logits

    reference = greedy_logits(None)
    worst, differing = 0.0, []
    identities = _identity_policies(input_ids.shape[1] + max_new_tokens)
    for policy in identities:
        for a, b in zip(reference, greedy_logits(policy)):
            if not torch.equal(a, b):
                worst = max(worst, (a - b).abs().max().item())
                differing.append(type(policy).__name__)
                break
    policies = ", ".join(type(policy).__name__ for policy in identities)
    note = (f"{len(identities)} policies at full budget bitwise equal to none ({policies})" if not differing
            else f"differ: {', '.join(differing)}")
    return CheckRow("compression", not differing, worst, None, 0.0, note=note)


def _generate_row(model, input_ids, attention_mask, max_new_tokens, tolerance) -> CheckRow:
    kwargs = dict(attention_mask=attention_mask, max_new_tokens=max_new_tokens, do_sample=False)
    cached = model.generate(input_ids, **kwargs)
    uncached = model.generate(input_ids, use_cache=False, **kwargs)
    prompt_len = input_ids.shape[1]
    length = min(cached.shape[1], uncached.shape[1])
    differs = (cached[:, :length] != uncached[:, :length]).any(0).nonzero()
    if cached.shape == uncached.shape and len(differs) == 0:
        return CheckRow("generate", True, 0.0, 0.0, 0.0, note=f"{cached.shape[1] - prompt_len} greedy tokens equal")
    first = int(differs[0]) if len(differs) else length
    if first < length:
        margin = _tie_margin(model, cached, uncached, attention_mask, first)
        if margin <= tolerance:
            return CheckRow("generate", True, margin, None, tolerance,
                            note=f"tokens differ from step {first - prompt_len} on a near tie: the two candidates' "
                                 f"logits differ by {margin:.1e} <= tolerance")
    fed = cached[:, :-1]
    fed_mask = extend_mask(attention_mask, fed.shape[1])
    divergence = localize(model, lambda: model.generate(input_ids, **kwargs), fed, fed_mask, tolerance)
    divergence = divergence or Divergence(None, None, None, first - prompt_len, first, float("nan"))
    return CheckRow("generate", False, None, None, 0.0, divergence,
                    note=f"tokens first differ at step {first - prompt_len}")


def _tie_margin(model, cached, uncached, attention_mask, first: int) -> float:
    """How far apart, in the uncached model's logits, the two tokens chosen at slot `first` are."""
    prefix = cached[:, :first]
    logits = model(prefix, attention_mask=extend_mask(attention_mask, first)).logits[:, -1].float()
    rows = (cached[:, first] != uncached[:, first]).nonzero().flatten()
    chosen = logits[rows, cached[rows, first]]
    alternative = logits[rows, uncached[rows, first]]
    return (chosen - alternative).abs().max().item()


def _original_rows(model, input_ids, attention_mask, full, real, tolerance) -> list[CheckRow]:
    rows, originals = [], {}
    for implementation in ATTENTION_IMPLEMENTATIONS:
        try:
            reference = unwrapped_copy(model, implementation)
        except (ValueError, ImportError) as error:
            rows.append(skipped_row(f"original[{implementation}]",
                                    f"transformers offers no {implementation} path ({error})"))
            continue
        originals[implementation] = original_logits(reference, input_ids, attention_mask)
        rows.append(compare(f"original[{implementation}]", full, originals[implementation], real, tolerance))
    if len(originals) == 2:
        eager, sdpa = originals["eager"], originals["sdpa"]
        upstream = compare("upstream[eager~sdpa]", eager, sdpa, real, tolerance, upstream=True,
                            note="transformers' own attention implementations compared with each other")
        rows.append(upstream)
        original_rows = [row for row in rows if row.check.startswith("original[")]
        if not upstream.passed and any(row.passed for row in original_rows):
            # The implementations disagree and the hooked model matches one: the other is the upstream bug.
            for row in original_rows:
                if not row.passed:
                    row.upstream = True
                    row.note = "upstream finding: this transformers implementation disagrees with the other"
    return rows


def _noop_hooks_row(model, input_ids, attention_mask, full, real, tolerance) -> CheckRow:
    model.set_explicit_attention(True)
    try:
        explicit = model(input_ids, attention_mask=attention_mask).logits
        hooked_logits = model.run_with_hooks(input_ids, attention_mask=attention_mask,
                                             fwd_hooks=[(lambda name: True, lambda activation, hook: activation)]).logits
    finally:
        model.set_explicit_attention(False)
    row = compare("noop_hooks", hooked_logits, explicit, real, 0.0, note="bitwise vs the explicit path")
    fast = compare("noop_hooks", explicit, full, real, tolerance)
    row.note += f"; explicit vs fast path {fast.max_abs_err:.1e}"
    row.passed = row.passed and fast.passed
    return row


