"""Recording overhead: greedy `generate` idle and recording attention hook points, against plain transformers
and TransformerLens' TransformerBridge recording the same hooks, on the same weights; and the prefill alone.

Per setting (prompt length x batch) every variant runs `repeats` alternating rounds after a warm-up. The
ratio is throughput relative to plain transformers `generate` (min times); the microseconds per recorded
hook call are (recording - idle) / calls, from the min times.
"""

from __future__ import annotations

import torch

from bench_model import SHAPE_TEXT, hooked_model, plain_model, prompt
from peers.tl_bridge import BRIDGE_ATTENTION_HOOKS, bridge_or_reason, bridge_recording_generate
from report import Section, target
from timing import alternate

ATTENTION_HOOKS = ("hook_q", "hook_k", "hook_v", "hook_attn_scores", "hook_pattern", "hook_z")


def attention_hook_names(num_layers: int) -> list[str]:
    return [f"blocks.{layer}.attn.{hook}" for layer in range(num_layers) for hook in ATTENTION_HOOKS]


def _generate(model, ids, new_tokens):
    def run():
        with torch.no_grad():
            model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens,
                           min_new_tokens=new_tokens, do_sample=False)
    return run


def _recording(model, names, ids, new_tokens, calls: list[int]):
    def run():
        with model.record(names) as recording:
            _generate(model, ids, new_tokens)()
        calls[:] = [sum(len(recording[name]) for name in recording.names())]
    return run


def _bridge(bridge, ids, new_tokens, hook_kinds, calls: list[int]):
    def run():
        calls[:] = [bridge_recording_generate(bridge, ids, new_tokens, hook_kinds)]
    return run


def generate_overhead(settings: list[tuple[int, int]], new_tokens: int, repeats: int) -> Section:
    plain, hooked = plain_model(), hooked_model()
    names = attention_hook_names(hooked.num_layers)
    bridge, reason = bridge_or_reason(plain_model())
    section = Section(
        "Recording overhead: greedy generate",
        f"{SHAPE_TEXT}; {new_tokens} new tokens; min / median / max seconds over {repeats} alternating rounds "
        f"after a warm-up; ratio = plain transformers time / this time (min). 'attention 24' records "
        f"{', '.join(ATTENTION_HOOKS)} of every layer; 'every hook' records all {len(hooked.hook_dict)} hook points."
        + ("" if bridge is not None else f" TransformerLens bridge: not run ({reason})."),
        ["prompt x batch", "variant", "seconds", "ratio to plain", "hook calls", "us per hook call"],
    )
    for tokens, batch in settings:
        ids = prompt(batch, tokens)
        calls24, calls_all, bridge_calls = [0], [0], [0]
        variants = {
            "transformers generate": _generate(plain, ids, new_tokens),
            "interp_cache idle": _generate(hooked, ids, new_tokens),
            "interp_cache attention 24": _recording(hooked, names, ids, new_tokens, calls24),
            "interp_cache every hook": _recording(hooked, None, ids, new_tokens, calls_all),
        }
        if bridge is not None:
            variants["TL bridge idle"] = _bridge(bridge, ids, new_tokens, None, [0])
            variants["TL bridge attention 24"] = _bridge(bridge, ids, new_tokens, BRIDGE_ATTENTION_HOOKS, bridge_calls)
        timings = alternate(variants, repeats)
        base = timings["transformers generate"].best
        per_call = {
            "interp_cache attention 24": ("interp_cache idle", calls24[0]),
            "interp_cache every hook": ("interp_cache idle", calls_all[0]),
            "TL bridge attention 24": ("TL bridge idle", bridge_calls[0]),
        }
        for name, timing in timings.items():
            ratio = base / timing.best
            if name == "interp_cache idle":
                shown = target(ratio, 0.95)
            elif name == "interp_cache attention 24":
                shown = target(ratio, 0.9)
            else:
                shown = f"{ratio:.2f}"
            calls, micro = "", ""
            if name in per_call:
                idle_name, calls = per_call[name]
                micro = f"{(timing.best - timings[idle_name].best) / max(calls, 1) * 1e6:.1f}"
            section.add(f"{tokens} x {batch}", name, timing.spread(digits=3), shown, calls, micro)
        if bridge is not None:
            faster = timings["interp_cache attention 24"].best < timings["TL bridge attention 24"].best
            section.notes.append(
                f"{tokens} x {batch}: recording the 24 is {'faster' if faster else 'SLOWER'} than the bridge doing the "
                f"same ({timings['TL bridge attention 24'].best / timings['interp_cache attention 24'].best:.2f}x)"
            )
    return section


def prefill_overhead(tokens: int, repeats: int) -> Section:
    plain, hooked = plain_model(), hooked_model()
    names = attention_hook_names(hooked.num_layers)
    ids = prompt(1, tokens)

    def forward(model):
        def run():
            with torch.no_grad():
                model(ids, attention_mask=torch.ones_like(ids))
        return run

    def recording_forward():
        with hooked.record(names):
            forward(hooked)()

    timings = alternate({
        "transformers forward": forward(plain),
        "interp_cache idle": forward(hooked),
        "interp_cache attention 24": recording_forward,
    }, repeats)
    section = Section(
        f"Prefill: one {tokens}-token forward",
        f"{SHAPE_TEXT}; batch 1; min / median / max seconds over {repeats} alternating rounds; ratio = plain / this.",
        ["variant", "seconds", "ratio to plain"],
    )
    base = timings["transformers forward"].best
    for name, timing in timings.items():
        section.add(name, timing.spread(digits=3), f"{base / timing.best:.2f}")
    return section
