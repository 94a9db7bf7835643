"""Decode step time against cached length, for the full cache and three compression policies, plotted.

The benchmark model prefills an n-token prompt under each policy, then decodes greedily; a step's time is
the minimum over the timed steps. Quest reads 1/16 of the entries, StreamingLLM and AdaKV(SnapKV) keep 1/8.
"""

from __future__ import annotations

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402

from bench_model import SHAPE_TEXT, hooked_model, prompt  # noqa: E402
from interp_cache.compress import AdaKV, Quest, SnapKV, StreamingLLM  # noqa: E402
from interp_cache.decoding import Stepper  # noqa: E402
from report import Section  # noqa: E402
from timing import seconds_of  # noqa: E402


def policies(tokens: int) -> dict[str, object]:
    return {
        "full": None,
        "Quest 1/16": Quest(budget=tokens // 16, page_size=16),
        "StreamingLLM 1/8": StreamingLLM(sink=4, window=tokens // 8 - 4),
        "AdaKV(SnapKV) 1/8": AdaKV(SnapKV(budget=tokens // 8)),
    }


def step_seconds(model, policy, ids, steps: int) -> float:
    stepper = Stepper(model, compress=policy)
    with torch.no_grad():
        token = stepper.prefill(ids)[:, -1].argmax(-1)
        times = []
        for _ in range(steps):
            def step():
                nonlocal token
                token = stepper.step(token).argmax(-1)
            times.append(seconds_of(step))
    return min(times[1:])  # the first step pays for one-off work (the first storage growth)


def scaling(lengths: list[int], steps: int, png_path) -> Section:
    model = hooked_model()
    names = list(policies(lengths[0]))
    ms = {name: [] for name in names}
    for tokens in lengths:
        ids = prompt(1, tokens)
        for name, policy in policies(tokens).items():
            ms[name].append(step_seconds(model, policy, ids, steps) * 1e3)
    section = Section(
        "Scaling: decode step time vs cached length",
        f"{SHAPE_TEXT}; batch 1; ms per greedy decode step (min of {steps - 1} steps after a prefill of n tokens); "
        f"figure: [{png_path.name}]({png_path.name}).",
        ["cached tokens", *names],
    )
    for index, tokens in enumerate(lengths):
        section.add(tokens, *[f"{ms[name][index]:.2f}" for name in names])
    figure, axes = plt.subplots(figsize=(6, 4))
    for name in names:
        axes.plot(lengths, ms[name], marker="o", label=name)
    axes.set_xscale("log", base=2)
    axes.set_xlabel("cached tokens")
    axes.set_ylabel("ms per decode step")
    axes.set_title("Decode step time vs cached length")
    axes.grid(alpha=0.3)
    axes.legend()
    figure.tight_layout()
    figure.savefig(png_path, dpi=120)
    plt.close(figure)
    return section
