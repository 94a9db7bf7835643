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
error) that differs beyond tolerance (`interp_cache.verify.localize`). `verify_decode_loop` does the same for a
user's own decode loop.

Errors: `max_abs_err` is the largest |a - b| over real (non-padding) positions; `max_rel_err` divides it
by the largest |reference logit|, so it reads as a fraction of the logit scale.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING

import torch

from interp_cache.compress import policy_classes
from interp_cache.decoding.stepper import Stepper
from interp_cache.verify.localize import first_divergence, localize

if TYPE_CHECKING:
    from interp_cache.models.hooked_model import HookedModel

DEFAULT_PROMPTS = (
    "The quick brown fox jumps over the lazy dog.",
    "KV caches store keys and values",
    "1 2 3 4 5",
)

# Max abs logit error accepted per dtype, by kind of comparison. float32 values were set from the largest
# error observed on correct runs over all zoo families (README, "Tolerances"), with margin.
TOLERANCES = {
    torch.float32: {"cache": 1e-4, "original": 1e-5},
    torch.bfloat16: {"cache": 2.5e-1, "original": 2.5e-1},
    torch.float16: {"cache": 5e-2, "original": 5e-2},
}
CHUNK_SIZES = (2, 3, 5)
ATTENTION_IMPLEMENTATIONS = ("eager", "sdpa")


@dataclass
class Divergence:
    hook: str | None
    layer: int | None
    head: int | None
    step: int | None
    position: int | None
    error: float


@dataclass
class CheckRow:
    check: str
    passed: bool
    max_abs_err: float | None
    max_rel_err: float | None
    tolerance: float | None
    first_divergence: Divergence | None = None
    upstream: bool = False
    note: str = ""


@dataclass
class VerifyReport:
    model: str
    dtype: str
    rows: list[CheckRow] = field(default_factory=list)
    strict_upstream: bool = False

    @property
    def passed(self) -> bool:
        return all(row.passed for row in self.rows if self.strict_upstream or not row.upstream)

    @property
    def first_divergence(self) -> Divergence | None:
        for row in self.rows:
            if not row.passed and not row.upstream and row.first_divergence is not None:
                return row.first_divergence
        return None

    def to_dict(self) -> dict:
        return {
            "model": self.model,
            "dtype": self.dtype,
            "passed": self.passed,
            "first_divergence": None if self.first_divergence is None else asdict(self.first_divergence),
            "rows": [asdict(row) for row in self.rows],
        }


def _compare(check, got, expected, real_mask, tolerance, upstream=False, note="") -> CheckRow:
    """Row for two logit tensors `[b, t, v]`; first divergence = first (row, position) above tolerance."""
    error_bt = (got.float() - expected.float()).abs().amax(-1).masked_fill(~real_mask, 0.0)
    max_abs = error_bt.max().item()
    scale = expected.float().abs().masked_fill(~real_mask[..., None], 0.0).max().item()
    max_rel = max_abs / scale if scale > 0 else 0.0
    passed = max_abs <= tolerance
    divergence = None
    if not passed:
        over = (error_bt > tolerance).nonzero()
        first = over[over[:, 1].argmin()]
        divergence = Divergence(None, None, None, None, int(first[1]), error_bt[first[0], first[1]].item())
    return CheckRow(check, passed, max_abs, max_rel, tolerance, divergence, upstream, note)


def _batch(model: "HookedModel", prompts):
    enc = model.tokenizer(list(prompts), padding=True, return_tensors="pt")
    return enc["input_ids"].to(model.device), enc["attention_mask"].to(model.device)


def _cached_in_chunks(model, input_ids, attention_mask, chunk: int) -> torch.Tensor:
    cache = model.new_cache()
    pieces = []
    for start in range(0, input_ids.shape[1], chunk):
        end = min(start + chunk, input_ids.shape[1])
        out = model(input_ids[:, start:end], attention_mask=attention_mask[:, :end], past_key_values=cache,
                    use_cache=True)
        pieces.append(out.logits)
    return torch.cat(pieces, dim=1)


def extend_mask(attention_mask: torch.Tensor, total_length: int) -> torch.Tensor:
    """The prompt's mask followed by ones for the generated slots, `[b, total_length]`."""
    extra = total_length - attention_mask.shape[1]
    return torch.cat([attention_mask, attention_mask.new_ones(attention_mask.shape[0], extra)], dim=1)


def padding_aware_position_ids(attention_mask: torch.Tensor) -> torch.Tensor:
    """Position ids as transformers' `generate` makes them: count real tokens, padding at 0."""
    return (attention_mask.cumsum(-1) - 1).clamp(min=0)


def unwrapped_copy(model: "HookedModel", attn_implementation: str):
    """The original transformers model with the same weights, under the given attention implementation."""
    from transformers import AutoModelForCausalLM

    config = type(model.config).from_dict(model.config.to_dict())
    reference = AutoModelForCausalLM.from_config(config, attn_implementation=attn_implementation, dtype=model.dtype)
    reference.load_state_dict(model.hf_model.state_dict())
    return reference.to(model.device).eval()


def original_logits(reference, input_ids, attention_mask) -> torch.Tensor:
    """An unwrapped transformers model called as `generate` calls it (padding-aware position ids)."""
    import inspect

    kwargs = {}
    if "position_ids" in inspect.signature(reference.forward).parameters:
        kwargs["position_ids"] = padding_aware_position_ids(attention_mask)
    return reference(input_ids, attention_mask=attention_mask, **kwargs).logits


def verify(
    model: "HookedModel",
    prompts=None,
    max_new_tokens: int = 16,
    strict_upstream: bool = False,
    name: str | None = None,
) -> VerifyReport:
    prompts = tuple(prompts or DEFAULT_PROMPTS)
    if model.tokenizer is None:
        raise ValueError("verify needs a model with a tokenizer (model.tokenizer is None)")
    tolerance = TOLERANCES.get(model.dtype)
    if tolerance is None:
        raise ValueError(f"verify has tolerances for {', '.join(map(str, TOLERANCES))}; the model is {model.dtype}")
    input_ids, attention_mask = _batch(model, prompts)
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
            row = _compare(check, _cached_in_chunks(model, input_ids, attention_mask, chunk), full, real,
                           tolerance["cache"])
            if not row.passed:
                row.first_divergence = localize(
                    model, lambda: _cached_in_chunks(model, input_ids, attention_mask, chunk),
                    input_ids, attention_mask, tolerance["cache"],
                ) or row.first_divergence
            rows.append(row)

        worst = None
        for row_index, prompt in enumerate(prompts):
            alone_ids, _ = _batch(model, [prompt])
            alone = model(alone_ids).logits
            n = alone_ids.shape[1]
            row = _compare("left_padding", full[row_index:row_index + 1, -n:], alone,
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


def verify_decode_loop(model: "HookedModel", loop_fn, prompts=None, max_new_tokens: int = 16) -> VerifyReport:
    """Run a user's decode loop and compare every forward it made with one uncached forward.

    `loop_fn(model, input_ids, attention_mask, max_new_tokens) -> LongTensor[b, new]` calls the model the
    way transformers models are called. Each logit row the loop produced is compared with the uncached
    logits at the same token slot; on disagreement the first divergent hook is localized.
    """
    prompts = tuple(prompts or DEFAULT_PROMPTS)
    tolerance = TOLERANCES[model.dtype]["cache"]
    input_ids, attention_mask = _batch(model, prompts)
    fed_pieces, logit_pieces = [], []

    def capture_inputs(module, args, kwargs):
        fed_pieces.append(kwargs["input_ids"] if "input_ids" in kwargs else args[0])

    def capture_logits(module, args, output):
        if output is not None:
            logit_pieces.append(output.logits.detach())

    handles = [model.hf_model.register_forward_pre_hook(capture_inputs, with_kwargs=True),
               model.hf_model.register_forward_hook(capture_logits)]
    try:
        with torch.no_grad(), model.record() as test:
            loop_fn(model, input_ids, attention_mask, max_new_tokens)
    finally:
        for handle in handles:
            handle.remove()
    if not fed_pieces:
        raise ValueError("the decode loop never called the model")
    fed = torch.cat(fed_pieces, dim=1)
    got = torch.cat(logit_pieces, dim=1)
    fed_mask = extend_mask(attention_mask, fed.shape[1])
    with torch.no_grad(), model.record() as reference:
        expected = model(fed, attention_mask=fed_mask).logits
    row = _compare("decode_loop", got, expected, fed_mask.bool(), tolerance)
    if not row.passed:
        row.first_divergence = first_divergence(test, reference, tolerance) or row.first_divergence
    report = VerifyReport(f"{model.family} decode loop", str(model.dtype).replace("torch.", ""))
    report.rows.append(row)
    return report


def _original_rows(model, input_ids, attention_mask, full, real, tolerance) -> list[CheckRow]:
    rows, originals = [], {}
    for implementation in ATTENTION_IMPLEMENTATIONS:
        try:
            reference = unwrapped_copy(model, implementation)
        except (ValueError, ImportError) as error:
            rows.append(CheckRow(f"original[{implementation}]", True, None, None, None, upstream=True,
                                 note=f"skipped: transformers offers no {implementation} path ({str(error)[:80]})"))
            continue
        originals[implementation] = original_logits(reference, input_ids, attention_mask)
        rows.append(_compare(f"original[{implementation}]", full, originals[implementation], real, tolerance))
    if len(originals) == 2:
        eager, sdpa = originals["eager"], originals["sdpa"]
        upstream = _compare("upstream[eager~sdpa]", eager, sdpa, real, tolerance, upstream=True,
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
    row = _compare("noop_hooks", hooked_logits, explicit, real, 0.0, note="bitwise vs the explicit path")
    fast = _compare("noop_hooks", explicit, full, real, tolerance)
    row.note += f"; explicit vs fast path {fast.max_abs_err:.1e}"
    row.passed = row.passed and fast.passed
    return row


# -- presentation -----------------------------------------------------------------------------------------
def format_table(reports: list[VerifyReport]) -> str:
    lines = [f"{'model':<14} {'check':<22} {'result':<9} {'max_abs':>9} {'max_rel':>9} {'tol':>8}  note"]
    for report in reports:
        for row in report.rows:
            result = "PASS" if row.passed else ("UPSTREAM" if row.upstream else "FAIL")
            lines.append(
                f"{report.model:<14} {row.check:<22} {result:<9} {_num(row.max_abs_err):>9} "
                f"{_num(row.max_rel_err):>9} {_num(row.tolerance):>8}  {row.note}"
            )
    return "\n".join(lines)


def format_markdown(reports: list[VerifyReport]) -> str:
    lines = ["| model | check | result | max abs | max rel | tolerance | note |", "|---|---|---|---|---|---|---|"]
    for report in reports:
        for row in report.rows:
            result = "pass" if row.passed else ("upstream finding" if row.upstream else "**FAIL**")
            lines.append(f"| {report.model} | {row.check} | {result} | {_num(row.max_abs_err)} | "
                         f"{_num(row.max_rel_err)} | {_num(row.tolerance)} | {row.note} |")
    return "\n".join(lines) + "\n"


def write_json(reports: list[VerifyReport], path: str) -> None:
    with open(path, "w") as f:
        json.dump([r.to_dict() for r in reports], f, indent=2)


def _num(value) -> str:
    return "-" if value is None else f"{value:.1e}"
