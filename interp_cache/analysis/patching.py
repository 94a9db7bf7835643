"""Step-selective patching: hook functions that act only at chosen decode steps, positions and heads.

    with model.hooks(fwd_hooks=[("blocks.1.hook_resid_post", at(add(v), steps=range(5, 10)))]):
        ...                                   # v is added at decode steps 5-9 only
    with model.hooks(fwd_hooks=from_source(clean_recording, names="blocks.1.attn.hook_z", heads=[2])):
        ...                                   # head 1.2's clean z, token by token

Selectors -- `steps`, ABSOLUTE `positions`, `heads`, `key_positions` -- are `interp_cache.analysis.selection`:
a position names the same token whether it arrives in a prefill, a chunked prefill or a decode step.
A hook whose step is not selected, or whose forward holds none of the selected slots, returns None --
TransformerLens' "no change" -- so forwards outside the selection are bitwise untouched and the hook
function is not even called there. The one thing a hook costs even where it selects nothing: hooking
`hook_attn_scores` or `hook_pattern` switches attention to the explicit (score-materialising) path for
every forward, which differs from SDPA by float rounding; compare against a run with the same hook
attached (or with `model.set_explicit_attention(True)`) when asserting bitwise equality.

`from_source(recording, ...)` replays a recorded (clean) run into another (corrupted) one aligned by
absolute position (`interp_cache.analysis.alignment`), with the same selectors.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import torch

from interp_cache.analysis.alignment import (
    EntryTable,
    KeyedTable,
    StepTable,
    TokenTable,
    source_rows,
)
from interp_cache.analysis.selection import IndexSelector, Selection, along
from interp_cache.core.attention import kv_to_query_heads
from interp_cache.core.hook_layout import HookKind

HookFn = Callable[[torch.Tensor, object], torch.Tensor | None]


# -- step-selective hook functions ----------------------------------------------------------------------
class SelectiveHook:
    """A TransformerLens hook function that applies `fn` only on the slots its `Selection` picks."""

    def __init__(self, fn: HookFn, selection: Selection):
        self.fn = fn
        self.selection = selection

    def __call__(self, activation: torch.Tensor, hook) -> torch.Tensor | None:
        mask = self.selection.mask(activation, hook)
        if mask is None:
            return None
        replacement = self.fn(activation, hook)
        if replacement is None:  # fn only looked
            return None
        return torch.where(mask, replacement, activation)

    def __repr__(self) -> str:
        return f"at({getattr(self.fn, '__qualname__', self.fn)!r}, {self.selection})"


def at(
    fn: HookFn,
    steps: IndexSelector = None,
    positions: IndexSelector = None,
    heads: IndexSelector = None,
    key_positions: IndexSelector = None,
) -> SelectiveHook:
    """`fn(activation, hook) -> replacement`, applied only at the selected steps / positions / heads.

    Use the result as any hook function: `model.hooks(fwd_hooks=[(name, at(zero(), steps=0, heads=2))])`.
    The replacement may be the activation's shape or broadcast to it; unselected slots keep their values.
    """
    if not callable(fn):
        raise TypeError(f"at() needs a hook function fn(activation, hook); got {type(fn).__name__}")
    return SelectiveHook(fn, Selection.of(steps, positions, heads, key_positions))


def add(vector: torch.Tensor) -> HookFn:
    """activation + vector (broadcast from the right, e.g. a `[m]` vector onto `[b, p, m]`)."""

    def add_vector(activation: torch.Tensor, hook) -> torch.Tensor:
        return activation + vector.to(device=activation.device, dtype=activation.dtype)

    return add_vector


def zero() -> HookFn:
    def zero_out(activation: torch.Tensor, hook) -> torch.Tensor:
        return torch.zeros_like(activation)

    return zero_out


def scale(factor: float | torch.Tensor) -> HookFn:
    """activation * factor (a number, or a tensor broadcast from the right)."""

    def scale_by(activation: torch.Tensor, hook) -> torch.Tensor:
        if isinstance(factor, torch.Tensor):
            return activation * factor.to(device=activation.device, dtype=activation.dtype)
        return activation * factor

    return scale_by


def replace_with(tensor: torch.Tensor) -> HookFn:
    """The selected slots take `tensor`'s values; `tensor` has the activation's shape or broadcasts to it."""

    def replace(activation: torch.Tensor, hook) -> torch.Tensor:
        try:
            return tensor.to(device=activation.device, dtype=activation.dtype).expand_as(activation)
        except RuntimeError:
            raise ValueError(
                f"replace_with: a tensor of shape {tuple(tensor.shape)} cannot replace {hook.name!r} of shape "
                f"{tuple(activation.shape)} (at step {hook.step}); give that shape or one that broadcasts to it"
            ) from None

    return replace


# -- patching from a source run -------------------------------------------------------------------------
class MissingSourceError(ValueError):
    """The target needs a value at a position the source run never computed."""


def _describe_missing(name: str, hook, rows: torch.Tensor, positions: torch.Tensor, what: str, covered: int) -> str:
    pairs = sorted({(int(r), int(t)) for r, t in zip(rows.tolist(), positions.tolist())})
    shown = ", ".join(f"row {r} {what} {t}" for r, t in pairs[:5]) + (" ..." if len(pairs) > 5 else "")
    return (
        f"the source recording has no value of {name!r} for {shown} (target step {hook.step}); it covers "
        f"positions 0..{covered - 1} where it ran -- record the source over the same token positions, or "
        "restrict positions=/steps="
    )


def _patch_tokens(table: TokenTable, activation, hook, mask):
    positions_bp = hook.positions.to(table.values_bt.device)
    rows_b = source_rows(table.values_bt.shape[0], positions_bp.shape[0], table.name, table.values_bt.device)
    values, have_bp = table.lookup(positions_bp, rows_b)
    have = along(have_bp, activation.ndim, (0, table.axis)).to(mask.device)
    missing = mask & ~have
    if bool(missing.any()):
        missing_bp = missing.expand(activation.shape).movedim(table.axis, 1)
        if missing_bp.ndim > 2:
            missing_bp = missing_bp.flatten(2).any(-1)
        rows, columns = missing_bp.nonzero(as_tuple=True)
        raise MissingSourceError(_describe_missing(
            table.name, hook, rows, hook.positions[rows, columns], "position", table.num_positions))
    return torch.where(mask, values.to(device=activation.device, dtype=activation.dtype), activation)


def _patch_keyed(table: KeyedTable, activation, hook, mask):
    device = table.values_bhqk.device
    b, h = activation.shape[:2]
    query_positions_bp = hook.positions.to(device)
    key_positions_bhk = kv_to_query_heads(hook.key_positions.to(device), h)
    rows_b = source_rows(table.values_bhqk.shape[0], b, table.name, device)
    values, have = table.lookup(query_positions_bp, key_positions_bhk, rows_b)
    have = have.to(mask.device)
    # A key after its query is causally invisible in every run: where the source never formed that pair
    # (it reached the query in a decode step), the target keeps its own (masked) value.
    causal = (key_positions_bhk[:, :, None, :] <= query_positions_bp[:, None, :, None]).to(mask.device)
    missing = mask & ~have & causal
    if bool(missing.any()):
        rows, _, queries, _ = missing.nonzero(as_tuple=True)
        raise MissingSourceError(_describe_missing(
            table.name, hook, rows, hook.positions[rows, queries], "query position", table.num_positions))
    return torch.where(mask & have, values.to(device=activation.device, dtype=activation.dtype), activation)


def _patch_entries(table: EntryTable, activation, hook, mask):
    device = table.values_bgt.device
    key_positions_bgk = hook.key_positions.to(device)
    rows_b = source_rows(table.values_bgt.shape[0], activation.shape[0], table.name, device)
    values, have_bgk = table.lookup(key_positions_bgk, rows_b)
    have = along(have_bgk, activation.ndim, (0, 1, 2)).to(mask.device)
    missing = mask & ~have
    if bool(missing.any()):
        rows, heads, entries = missing.reshape(missing.shape[:3]).nonzero(as_tuple=True)
        raise MissingSourceError(_describe_missing(
            table.name, hook, rows, hook.key_positions[rows, heads, entries], "entry position", table.num_positions))
    return torch.where(mask, values.to(device=activation.device, dtype=activation.dtype), activation)


def _patch_step(table: StepTable, activation, hook, mask):
    source = table.by_step.get(hook.step)
    if source is None:
        raise MissingSourceError(
            f"the source recording has no call of {table.name!r} at step {hook.step} (a policy hook is aligned "
            f"by step; it has steps {sorted(table.by_step)})"
        )
    if source.shape != activation.shape:
        raise ValueError(
            f"the source {table.name!r} at step {hook.step} has shape {tuple(source.shape)}; the target's is "
            f"{tuple(activation.shape)} (policy hooks are patched whole, step by step)"
        )
    return torch.where(mask, source.to(device=activation.device, dtype=activation.dtype), activation)


_PATCHES = {TokenTable: _patch_tokens, KeyedTable: _patch_keyed, EntryTable: _patch_entries, StepTable: _patch_step}


def _aligned_table(name: str, layout, calls):
    if layout.kind is HookKind.TOKENS:
        return TokenTable(name, calls, layout.token_axis)
    if layout.kind is HookKind.KEYED:
        return KeyedTable(name, calls)
    if layout.kind is HookKind.ENTRIES:
        return EntryTable(name, calls)
    return StepTable(name, calls)


class SourceHook:
    """A hook function that writes a source run's activations into the selected slots of the target's."""

    def __init__(self, table, selection: Selection):
        self.table = table
        self.selection = selection

    def select(
        self,
        steps: IndexSelector = None,
        positions: IndexSelector = None,
        heads: IndexSelector = None,
        key_positions: IndexSelector = None,
    ) -> SourceHook:
        """The same source, another selection (the aligned table is built once and shared)."""
        return SourceHook(self.table, Selection.of(steps, positions, heads, key_positions))

    def __call__(self, activation: torch.Tensor, hook) -> torch.Tensor | None:
        mask = self.selection.mask(activation, hook)
        if mask is None:
            return None
        return _PATCHES[type(self.table)](self.table, activation, hook, mask)

    def __repr__(self) -> str:
        return f"SourceHook({self.table.name!r}, {self.selection})"


def _matching_names(recording, names) -> list[str]:
    recorded = recording.names()
    if names is None:
        return recorded
    if isinstance(names, str):
        chosen = [names]
    elif callable(names):
        chosen = [name for name in recorded if names(name)]
        if not chosen:
            raise ValueError(f"the names filter matches none of the recorded hooks: {', '.join(recorded)}")
        return chosen
    else:
        chosen = list(names)
    absent = [name for name in chosen if name not in recording]
    if absent:
        raise ValueError(
            f"the source recording has no calls of {', '.join(map(repr, absent))}; record them in the source run "
            f"(it recorded: {', '.join(recorded) or 'nothing'})"
        )
    return chosen


def from_source(
    recording,
    names: str | Iterable[str] | Callable[[str], bool] | None = None,
    steps: IndexSelector = None,
    positions: IndexSelector = None,
    heads: IndexSelector = None,
    key_positions: IndexSelector = None,
) -> list[tuple[str, SourceHook]]:
    """fwd_hooks that replay `recording`'s activations of `names` (default: all) into another run.

    Alignment is by absolute position, never by step or chunk offset: a per-token hook's token at position
    t receives the source's value at position t, wherever the source computed it (prefill, a chunk, a
    decode step); keyed hooks `[b, h, p, k]` align query rows by query position and key columns by the key
    position each entry holds (a key after its query, which no run can see, keeps the target's value where
    the source never formed that pair); cache-entry hooks align entries by position; compression-policy
    hooks, which have no token axis, align by step. Padding tokens and padding / hole entries keep the
    target's values. Where a selected slot has no source value, the run stops with `MissingSourceError`.
    The source batch must equal the target's or have one row (broadcast to every target row).

    The recording should hold one run: a second run over the same positions overwrites the first. The
    aligned tables are built now (a keyed hook's is `[b, h, T, T]` over the T positions the source ran),
    so the recording may be freed afterwards.
    """
    selection = Selection.of(steps, positions, heads, key_positions)
    hooks = []
    for name in _matching_names(recording, names):
        calls, layout = recording[name], recording.layout(name)
        selection.check(name, layout, calls[0].activation)  # fail before the target runs, not in the middle of it
        table = _aligned_table(name, layout, calls)
        hooks.append((name, SourceHook(table, selection)))
    return hooks
