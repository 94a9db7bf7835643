"""A benchmark section's result: a titled table plus the settings it ran with, printed and written as Markdown."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class Section:
    title: str
    settings: str
    headers: list[str]
    rows: list[list[str]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def add(self, *cells) -> None:
        self.rows.append([str(cell) for cell in cells])

    def markdown(self) -> str:
        lines = [f"## {self.title}", "", self.settings, ""]
        lines.append("| " + " | ".join(self.headers) + " |")
        lines.append("|" + "---|" * len(self.headers))
        lines += ["| " + " | ".join(row) + " |" for row in self.rows]
        if self.notes:
            lines.append("")
            lines += [f"- {note}" for note in self.notes]
        return "\n".join(lines) + "\n"


def target(value: float, bound: float, at_least: bool = True) -> str:
    """`value` with a mark: met, or MISSED against `bound`."""
    met = value >= bound if at_least else value <= bound
    sign = ">=" if at_least else "<="
    return f"{value:.2f} ({'met' if met else 'MISSED'}: {sign} {bound:g})"
