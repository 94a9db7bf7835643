"""Activation-patching sweeps: clean activations into a corrupted run, one (layer, head) or (layer, position) at a time.

    result = sweep(model, clean_ids, corrupted_ids, logit_diff(a, b), over="layer_position")
    result.patched       # [layers, positions]: the metric of the corrupted run with that one slot patched clean
    result.normalized()  # (patched - corrupted) / (clean - corrupted): 0 no effect, 1 full recovery

Each run feeds its tokens as a prefill of `prefill` tokens and then one decode step per remaining token
(`prefill=None`: one forward over everything), so a sweep can patch cached decode steps (`steps=`) as
well as a single forward. Clean and corrupted runs feed the same number of tokens the same way, so
absolute positions align; the clean activations are replayed with `from_source`.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass

import torch
from tqdm.auto import tqdm

from interp_cache.analysis.patching import SourceHook, from_source
from interp_cache.analysis.selection import IndexSelector
from interp_cache.core.hook_layout import HookKind
from interp_cache.decoding.stepper import Stepper

Metric = Callable[[torch.Tensor], torch.Tensor | float]
_DEFAULT_HOOKS = {"layer_head": "attn.hook_z", "layer_position": "hook_resid_pre"}


def logit_diff(token_a: int, token_b: int) -> Metric:
    """logits[a] - logits[b] at the last position, averaged over the batch (not normalized).

    Takes the final forward's logits `[b, p, vocab]` (or `[b, vocab]`). Left padding keeps every row's last
    token at the last position, so this reads each row's prediction for the next token.
    """

    def metric(logits: torch.Tensor) -> torch.Tensor:
        last_bv = logits[:, -1] if logits.ndim == 3 else logits
        return (last_bv[:, token_a] - last_bv[:, token_b]).float().mean()

    return metric


@dataclass
class SweepResult:
    patched: torch.Tensor  # [layers, slots] metric of the corrupted run with one slot patched clean
    clean: float  # metric of the clean run
    corrupted: float  # metric of the corrupted run, nothing patched
    layers: list[int]  # row i of `patched` is layer layers[i]
    slots: list[int]  # column j is head / absolute position slots[j]
    over: str
    hook: str

    def normalized(self) -> torch.Tensor:
        """(patched - corrupted) / (clean - corrupted): 0 where the slot does nothing, 1 where it restores all."""
        if self.clean == self.corrupted:
            raise ValueError(f"clean and corrupted metrics are equal ({self.clean}); normalized effects are undefined")
        return (self.patched - self.corrupted) / (self.clean - self.corrupted)


def feed(
    model,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
    prefill: int | None = None,
) -> torch.Tensor:
    """Feed `input_ids` through a fresh cache: `prefill` tokens, then one decode step per token left.

    Returns the final forward's logits `[b, p, vocab]` (`p` = 1 after a decode step).
    """
    total = input_ids.shape[1]
    if prefill is None:
        prefill = total
    if not 1 <= prefill <= total:
        raise ValueError(f"prefill must be between 1 and the {total} tokens fed; got {prefill}")
    if attention_mask is None:
        attention_mask = torch.ones_like(input_ids)
    stepper = Stepper(model)
    logits = stepper.prefill(input_ids[:, :prefill], attention_mask[:, :prefill])
    for t in range(prefill, total):
        logits = stepper.prefill(input_ids[:, t : t + 1], attention_mask[:, t : t + 1])
    return logits


def _scalar(value, what: str) -> float:
    if isinstance(value, torch.Tensor):
        if value.numel() != 1:
            raise ValueError(f"the metric must return a scalar; it returned shape {tuple(value.shape)} for {what}")
        return float(value.item())
    return float(value)


def _layers(model, layers: Iterable[int] | None) -> list[int]:
    if layers is None:
        return list(range(model.num_layers))
    chosen = list(layers)
    bad = [layer for layer in chosen if not 0 <= layer < model.num_layers]
    if bad or not chosen:
        raise ValueError(f"layers must be a non-empty list of indices in 0..{model.num_layers - 1}; got {chosen}")
    return chosen


def sweep(
    model,
    clean_ids: torch.Tensor,
    corrupted_ids: torch.Tensor,
    metric: Metric,
    over: str = "layer_head",
    hook: str | None = None,
    *,
    attention_mask: torch.Tensor | None = None,
    corrupted_attention_mask: torch.Tensor | None = None,
    layers: Iterable[int] | None = None,
    positions: Iterable[int] | None = None,
    steps: IndexSelector = None,
    prefill: int | None = None,
    progress: bool = True,
) -> SweepResult:
    """Patch clean activations of `blocks.{layer}.{hook}` into the corrupted run one slot at a time.

    over="layer_head": one head at a time (default hook "attn.hook_z"); result `[layers, heads]`.
    over="layer_position": one absolute position at a time (default hook "hook_resid_pre"; query rows of
    keyed hooks, entries of cache-read hooks); result `[layers, positions]`, positions 0..T-1 unless given.

    `result.patched[i, j]` is `metric(final logits)` of the corrupted run with that one slot patched clean:
    the corrupted metric where the slot does not matter, the clean metric where it carries everything;
    `result.normalized()` rescales to 0 .. 1 (see `SweepResult`). `steps` restricts patching to those
    forwards (see `feed` for how `prefill` splits the run into forwards). `attention_mask` is the clean
    run's; `corrupted_attention_mask` defaults to it. Runs `1 + 1 + layers x slots` passes over the tokens.
    """
    if over not in _DEFAULT_HOOKS:
        raise ValueError(f"over must be one of {', '.join(map(repr, _DEFAULT_HOOKS))}; got {over!r}")
    if clean_ids.shape != corrupted_ids.shape:
        raise ValueError(
            f"clean_ids {tuple(clean_ids.shape)} and corrupted_ids {tuple(corrupted_ids.shape)} must have the same "
            "shape, so that absolute positions align"
        )
    if corrupted_attention_mask is None:
        corrupted_attention_mask = attention_mask
    hook = hook or _DEFAULT_HOOKS[over]
    layer_list = _layers(model, layers)
    names = [f"blocks.{layer}.{hook}" for layer in layer_list]
    unknown = [name for name in names if name not in model.hook_dict]
    if unknown:
        raise ValueError(
            f"this {model.family} model has no hook {unknown[0]!r}; hook= is a name inside a block, e.g. "
            "'attn.hook_z', 'hook_resid_pre', 'attn.hook_pattern', 'cache.hook_v_read'"
        )
    layout = model.hook_point(names[0]).layout
    if over == "layer_head" and layout.head_axis is None:
        raise ValueError(f"over='layer_head' needs a hook with a head axis; {hook!r} has none")
    if over == "layer_position" and layout.kind is HookKind.POLICY:
        raise ValueError(f"over='layer_position' needs a hook with a token or entry axis; {hook!r} has none")

    with model.record(names, device=model.device) as recording:  # replayed on the model's device
        clean_metric = _scalar(metric(feed(model, clean_ids, attention_mask, prefill)), "the clean run")
    corrupted_metric = _scalar(
        metric(feed(model, corrupted_ids, corrupted_attention_mask, prefill)), "the corrupted run"
    )

    sources: dict[str, SourceHook] = dict(from_source(recording, names=names, steps=steps))
    if over == "layer_head":
        first = recording[names[0]][0].activation
        slots = list(range(first.shape[layout.head_axis]))
    elif positions is None:
        slots = list(range(max(sources[name].table.num_positions for name in names)))
    else:
        slots = list(positions)
    del recording

    result = torch.empty(len(layer_list), len(slots))
    with tqdm(total=result.numel(), desc=f"sweep {hook} over {over}", disable=not progress) as bar:
        for i, name in enumerate(names):
            for j, slot in enumerate(slots):
                selected = {"heads" if over == "layer_head" else "positions": [slot]}
                patch = sources[name].select(steps=steps, **selected)
                with model.hooks(fwd_hooks=[(name, patch)]):
                    logits = feed(model, corrupted_ids, corrupted_attention_mask, prefill)
                result[i, j] = _scalar(metric(logits), f"{name} {over.split('_')[1]} {slot}")
                bar.update()
    return SweepResult(result, clean_metric, corrupted_metric, layer_list, slots, over, hook)
