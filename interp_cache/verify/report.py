"""What a verification reports: one row per check, the first divergence, and the report as a table,
Markdown or JSON.

Errors: `max_abs_err` is the largest |a - b| over real (non-padding) positions; `max_rel_err` divides it
by the largest |reference logit|, so it reads as a fraction of the logit scale.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field


@dataclass
class Divergence:
    hook: str | None
    layer: int | None
    head: int | None
    step: int | None
    position: int | None
    error: float
    row: int | None = None  # the batch row where it was found
    # a user's loop on a plain model: what it passed at that step (position ids used, the length its cache
    # reported, the mask's length) next to the true values
    loop_inputs: dict | None = None


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
    skipped: bool = False  # the check could not run (the note says why): neither passed nor failed

    @property
    def status(self) -> str:
        """"pass", "fail", "upstream" (a finding about transformers, see the note) or "skip"."""
        if self.skipped:
            return "skip"
        return "pass" if self.passed else ("upstream" if self.upstream else "fail")


def skipped_row(check: str, reason: str) -> CheckRow:
    return CheckRow(check, False, None, None, None, note=f"skipped: {reason}", skipped=True)


@dataclass
class VerifyReport:
    model: str
    dtype: str
    rows: list[CheckRow] = field(default_factory=list)
    strict_upstream: bool = False

    @property
    def passed(self) -> bool:
        return all(row.passed for row in self.rows if not row.skipped and (self.strict_upstream or not row.upstream))

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
            "rows": [{**asdict(row), "status": row.status} for row in self.rows],
        }


# The tolerances were set on logits of about this size (the zoo's); rounding error grows with the
# magnitude of what is summed, so a model whose logits are larger gets a proportionally larger tolerance
# (measured: the trained zoo:needle, logits ~19, cached vs uncached 9.7e-5, 3x the zoo's worst).
LOGIT_SCALE = 8.0


def compare(check, got, expected, real_mask, tolerance, upstream=False, note="") -> CheckRow:
    """Row for two logit tensors `[b, t, v]`; first divergence = first (row, position) above tolerance.

    `tolerance` is for logits of size `LOGIT_SCALE`; it is scaled by `max(1, max|expected| / LOGIT_SCALE)`
    (the row reports the tolerance it applied)."""
    error_bt = (got.float() - expected.float()).abs().amax(-1).masked_fill(~real_mask, 0.0)
    max_abs = error_bt.max().item()
    scale = expected.float().abs().masked_fill(~real_mask[..., None], 0.0).max().item()
    max_rel = max_abs / scale if scale > 0 else 0.0
    tolerance = tolerance * max(1.0, scale / LOGIT_SCALE)
    passed = max_abs <= tolerance
    divergence = None
    if not passed:
        over = (error_bt > tolerance).nonzero()
        first = over[over[:, 1].argmin()]
        divergence = Divergence(None, None, None, None, int(first[1]), error_bt[first[0], first[1]].item(),
                                row=int(first[0]))
    return CheckRow(check, passed, max_abs, max_rel, tolerance, divergence, upstream, note)


# -- presentation -----------------------------------------------------------------------------------------
def format_table(reports: list[VerifyReport]) -> str:
    lines = [f"{'model':<14} {'check':<22} {'result':<9} {'max_abs':>9} {'max_rel':>9} {'tol':>8}  note"]
    for report in reports:
        for row in report.rows:
            result = row.status.upper()
            lines.append(
                f"{report.model:<14} {row.check:<22} {result:<9} {_num(row.max_abs_err):>9} "
                f"{_num(row.max_rel_err):>9} {_num(row.tolerance):>8}  {row.note}"
            )
    return "\n".join(lines)


def format_markdown(reports: list[VerifyReport]) -> str:
    lines = ["| model | check | result | max abs | max rel | tolerance | note |", "|---|---|---|---|---|---|---|"]
    for report in reports:
        for row in report.rows:
            result = {"pass": "pass", "skip": "skipped", "upstream": "upstream finding", "fail": "**FAIL**"}[row.status]
            lines.append(f"| {report.model} | {row.check} | {result} | {_num(row.max_abs_err)} | "
                         f"{_num(row.max_rel_err)} | {_num(row.tolerance)} | {row.note} |")
    return "\n".join(lines) + "\n"


def write_json(reports: list[VerifyReport], path: str) -> None:
    with open(path, "w") as f:
        json.dump([r.to_dict() for r in reports], f, indent=2)


def _num(value) -> str:
    return "-" if value is None else f"{value:.1e}"
