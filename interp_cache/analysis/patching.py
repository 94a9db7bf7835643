"""Step-selective patching: hook functions that act only at chosen decode steps, positions and heads.

    with model.hooks(fwd_hooks=[("blocks.1.hook_resid_post", at(add(v), steps=range(5, 10)))]):
        ...                                   # v is added at decode steps 5-9 only
    with model.hooks(fwd_hooks=from_source(clean_recording, names="blocks.1.attn.hook_z", heads=[2])):
        ...                                   # head 1.2's clean z, token by token

Selectors (each None = everything):

- `steps`: decode steps (`hook.step`; 0 is the first forward on a cache, usually the prefill).
- `positions`: ABSOLUTE token positions (`hook.positions`), never offsets into the current chunk, so a
  position names the same token whether it arrives in a prefill, a chunked prefill or a decode step.
  Per-token hooks `[b, p, ...]` / `[b, g, p, d]`: the tokens at those positions. Keyed hooks
  (`hook_pos_bias`, `hook_attn_scores`, `hook_pattern`, `[b, h, p, k]`): the query rows at those
  positions. Cache-entry hooks (`hook_k_read`, `hook_v_read`, `hook_positions`, `[b, g, k, ...]`): the
  entries stored for those positions (`hook.key_positions`).
- `heads`: indices on the hook's head axis -- query heads for q / rot_q / z and the keyed hooks, KV heads
  for k / v / rot_k and the cache hooks.
- `key_positions` (keyed hooks only): the key columns whose entries hold those positions.

Padding tokens and padding / hole cache entries (position -1) are never selected: they stand for no token.
A hook whose step is not selected, or whose forward holds none of the selected slots, returns None --
TransformerLens' "no change" -- so forwards outside the selection are bitwise untouched and the hook
function is not even called there. The one thing a hook costs even where it selects nothing: hooking
`hook_attn_scores` or `hook_pattern` switches attention to the explicit (score-materialising) path for
every forward, which differs from SDPA by float rounding; compare against a run with the same hook
attached (or with `model.set_explicit_attention(True)`) when asserting bitwise equality.

`from_source(recording, ...)` replays a recorded (clean) run into another (corrupted) one aligned by
absolute position, with the same selectors; see its docstring for how each kind of hook is aligned.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass

import torch

from interp_cache.core.attention import kv_to_query_heads
from interp_cache.analysis.recording import KEYED_HOOKS, head_axis, is_policy_hook, position_axis

HookFn = Callable[[torch.Tensor, object], torch.Tensor | None]
IndexSelector = int | Iterable[int] | torch.Tensor | None

_HEAD_AXIS_HELP = (
    "heads= applies to hook_q/k/v/rot_q/rot_k/z (head axis 2) and hook_pos_bias/attn_scores/pattern, "
    "cache.hook_k_write/v_write/k_read/v_read/positions (head axis 1)"
)


# -- what kind of axes a hook has ---------------------------------------------------------------------
def hook_kind(name: str) -> str:
    """The hook's layout: "tokens" (a slot per new token), "keyed" [b, h, p, k], "entries" [b, g, k, ...], "policy"."""
    if is_policy_hook(name):
        return "policy"
    if name.rsplit(".", 1)[-1] in KEYED_HOOKS:
        return "keyed"
    return "entries" if position_axis(name) is None else "tokens"


def _along(mask: torch.Tensor, ndim: int, axes: tuple[int, ...]) -> torch.Tensor:
    """View `mask` so its dims sit on `axes` of an `ndim`-dim activation (size 1 elsewhere)."""
    shape = [1] * ndim
    for axis, size in zip(axes, mask.shape):
        shape[axis] = size
    return mask.reshape(shape)


# -- selectors ------------------------------------------------------------------------------------------
def _index_set(value: IndexSelector, what: str) -> frozenset[int] | None:
    if value is None:
        return None
    if isinstance(value, torch.Tensor):
        if value.is_floating_point() or value.is_complex() or value.dtype == torch.bool:
            raise ValueError(f"{what}= must hold integers; got a {value.dtype} tensor")
        value = value.flatten().tolist()
    items = [value] if isinstance(value, int) else value
    try:
        items = list(items)
    except TypeError:
        raise ValueError(
            f"{what}= must be an int, an iterable of ints (list, range, ...) or None for all; got {value!r}"
        ) from None
    for item in items:
        if isinstance(item, bool) or not isinstance(item, int) or item < 0:
            raise ValueError(f"{what}= must be non-negative integers; got {item!r} in {value!r}")
    if not items:
        raise ValueError(f"{what}= is empty, so it selects nothing; pass None to select every {what[:-1]}")
    return frozenset(items)


@dataclass(frozen=True)
class Selection:
    """Which slots of a hook's activation a patch touches: steps x positions x heads (x key positions)."""

    steps: frozenset[int] | None = None
    positions: frozenset[int] | None = None
    heads: frozenset[int] | None = None
    key_positions: frozenset[int] | None = None

    @classmethod
    def of(
        cls,
        steps: IndexSelector = None,
        positions: IndexSelector = None,
        heads: IndexSelector = None,
        key_positions: IndexSelector = None,
    ) -> Selection:
        return cls(
            _index_set(steps, "steps"),
            _index_set(positions, "positions"),
            _index_set(heads, "heads"),
            _index_set(key_positions, "key_positions"),
        )

    def check(self, name: str, activation: torch.Tensor) -> None:
        """Raise ValueError when a selector does not fit the hook `name` (checked at every call)."""
        kind = hook_kind(name)
        if self.positions is not None and kind == "policy":
            raise ValueError(
                f"positions= cannot select on {name!r}: a compression policy's scores / keep-set have no token "
                "axis; select it by steps= only"
            )
        if self.key_positions is not None and kind != "keyed":
            raise ValueError(
                f"key_positions= selects key columns of [b, h, p, k] hooks ({', '.join(KEYED_HOOKS)}); "
                f"{name!r} has none" + (" (its entries are selected by positions=)" if kind == "entries" else "")
            )
        if self.heads is not None:
            axis = head_axis(name)
            if axis is None:
                raise ValueError(f"heads= cannot select on {name!r}: it has no head axis; {_HEAD_AXIS_HELP}")
            num_heads = activation.shape[axis]
            if max(self.heads) >= num_heads:
                raise ValueError(
                    f"heads={sorted(self.heads)} out of range for {name!r}, which has {num_heads} heads "
                    f"(indices 0..{num_heads - 1}) on axis {axis}"
                )

    def selects_step(self, step: int | None) -> bool:
        return self.steps is None or step in self.steps

    def mask(self, activation: torch.Tensor, hook) -> torch.Tensor | None:
        """Boolean mask broadcastable to `activation`, True on selected slots; None when none is selected."""
        name = hook.name
        self.check(name, activation)
        if not self.selects_step(hook.step):
            return None
        kind = hook_kind(name)
        ndim = activation.ndim
        device = activation.device
        if kind == "policy":
            mask = torch.ones((1,) * ndim, dtype=torch.bool, device=device)
        elif kind == "entries":
            key_positions_bgk = hook.key_positions
            entry_bgk = key_positions_bgk >= 0
            if self.positions is not None:
                entry_bgk = entry_bgk & _isin(key_positions_bgk, self.positions)
            mask = _along(entry_bgk, ndim, (0, 1, 2))
        else:
            token_bp = ~hook.is_padding
            if self.positions is not None:
                token_bp = token_bp & _isin(hook.positions, self.positions)
            if kind == "tokens":
                mask = _along(token_bp, ndim, (0, position_axis(name)))
            else:
                key_positions_bhk = kv_to_query_heads(hook.key_positions, activation.shape[1])
                column_bhk = key_positions_bhk >= 0
                if self.key_positions is not None:
                    column_bhk = column_bhk & _isin(key_positions_bhk, self.key_positions)
                mask = token_bp[:, None, :, None] & column_bhk[:, :, None, :]
        if self.heads is not None:
            axis = head_axis(name)
            head_h = torch.zeros(activation.shape[axis], dtype=torch.bool, device=device)
            head_h[sorted(self.heads)] = True
            mask = mask & _along(head_h, ndim, (axis,))
        return mask if bool(mask.any()) else None


def _isin(values: torch.Tensor, selected: frozenset[int]) -> torch.Tensor:
    return torch.isin(values, torch.tensor(sorted(selected), dtype=values.dtype, device=values.device))


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


def _source_rows(num_source_rows: int, num_target_rows: int, name: str, device) -> torch.Tensor:
    if num_source_rows == num_target_rows:
        return torch.arange(num_target_rows, device=device)
    if num_source_rows == 1:
        return torch.zeros(num_target_rows, dtype=torch.long, device=device)
    raise ValueError(
        f"the source of {name!r} has batch size {num_source_rows}; the target has {num_target_rows} "
        "(they must match, or the source must have one row to broadcast)"
    )


def _describe_missing(name: str, hook, rows: torch.Tensor, positions: torch.Tensor, what: str, covered: int) -> str:
    pairs = sorted({(int(r), int(t)) for r, t in zip(rows.tolist(), positions.tolist())})
    shown = ", ".join(f"row {r} {what} {t}" for r, t in pairs[:5]) + (" ..." if len(pairs) > 5 else "")
    return (
        f"the source recording has no value of {name!r} for {shown} (target step {hook.step}); it covers "
        f"positions 0..{covered - 1} where it ran -- record the source over the same token positions, or "
        "restrict positions=/steps="
    )


class _TokenTable:
    """Per-token hooks: the source value of every (row, absolute position), wherever it was computed."""

    def __init__(self, name: str, calls: list):
        self.name = name
        self.axis = position_axis(name)
        first = calls[0].activation.movedim(self.axis, 1)
        self.num_positions = 1 + max(int(c.positions.masked_fill(c.is_padding, -1).max()) for c in calls)
        b = first.shape[0]
        self.values_bt = first.new_zeros((b, max(self.num_positions, 1), *first.shape[2:]))
        self.have_bt = torch.zeros((b, max(self.num_positions, 1)), dtype=torch.bool, device=first.device)
        for call in calls:
            activation = call.activation.movedim(self.axis, 1)
            rows, columns = (~call.is_padding).nonzero(as_tuple=True)
            positions = call.positions[rows, columns]
            self.values_bt[rows, positions] = activation[rows, columns]
            self.have_bt[rows, positions] = True

    def patch(self, activation: torch.Tensor, hook, mask: torch.Tensor) -> torch.Tensor:
        positions_bp = hook.positions.to(self.values_bt.device)
        rows_b = _source_rows(self.values_bt.shape[0], positions_bp.shape[0], self.name, self.values_bt.device)
        inside_bp = positions_bp < self.num_positions
        index_bp = positions_bp.clamp(max=self.values_bt.shape[1] - 1)
        have_bp = self.have_bt[rows_b[:, None], index_bp] & inside_bp
        values = self.values_bt[rows_b[:, None], index_bp].movedim(1, self.axis)
        have = _along(have_bp, activation.ndim, (0, self.axis)).to(mask.device)
        missing = mask & ~have
        if bool(missing.any()):
            missing_bp = missing.expand(activation.shape).movedim(self.axis, 1)
            if missing_bp.ndim > 2:
                missing_bp = missing_bp.flatten(2).any(-1)
            rows, columns = missing_bp.nonzero(as_tuple=True)
            raise MissingSourceError(_describe_missing(
                self.name, hook, rows, hook.positions[rows, columns], "position", self.num_positions))
        return torch.where(mask, values.to(device=activation.device, dtype=activation.dtype), activation)


class _KeyedTable:
    """[b, h, p, k] hooks: the source value of every (row, head, query position, key position)."""

    def __init__(self, name: str, calls: list):
        self.name = name
        self.num_positions = 1 + max(int(c.positions.masked_fill(c.is_padding, -1).max()) for c in calls)
        first = calls[0].activation
        b, h = first.shape[:2]
        t = max(self.num_positions, 1)
        self.values_bhqk = first.new_zeros((b, h, t, t))
        self.have_bhqk = torch.zeros((b, h, t, t), dtype=torch.bool, device=first.device)
        for call in calls:
            key_positions_bhk = kv_to_query_heads(call.key_positions, h)
            valid_bhpk = (~call.is_padding)[:, None, :, None] & (key_positions_bhk >= 0)[:, :, None, :]
            rows, heads, queries, keys = valid_bhpk.nonzero(as_tuple=True)
            query_positions = call.positions[rows, queries]
            key_positions = key_positions_bhk[rows, heads, keys]
            self.values_bhqk[rows, heads, query_positions, key_positions] = call.activation[rows, heads, queries, keys]
            self.have_bhqk[rows, heads, query_positions, key_positions] = True

    def patch(self, activation: torch.Tensor, hook, mask: torch.Tensor) -> torch.Tensor:
        device = self.values_bhqk.device
        b, h = activation.shape[:2]
        query_positions_bp = hook.positions.to(device)
        key_positions_bhk = kv_to_query_heads(hook.key_positions.to(device), h)
        rows_b = _source_rows(self.values_bhqk.shape[0], b, self.name, device)
        limit = self.values_bhqk.shape[-1] - 1
        query_b1p1 = query_positions_bp.clamp(min=0, max=limit)[:, None, :, None]
        key_bh1k = key_positions_bhk.clamp(min=0, max=limit)[:, :, None, :]
        heads_1h11 = torch.arange(h, device=device)[None, :, None, None]
        rows_b111 = rows_b[:, None, None, None]
        query_inside_b1p1 = (query_positions_bp < self.num_positions)[:, None, :, None]
        key_inside_bh1k = (key_positions_bhk < self.num_positions)[:, :, None, :]
        have = self.have_bhqk[rows_b111, heads_1h11, query_b1p1, key_bh1k] & query_inside_b1p1 & key_inside_bh1k
        values = self.values_bhqk[rows_b111, heads_1h11, query_b1p1, key_bh1k]
        have = have.to(mask.device)
        # A key after its query is causally invisible in every run: where the source never formed that pair
        # (it reached the query in a decode step), the target keeps its own (masked) value.
        causal = (key_positions_bhk[:, :, None, :] <= query_positions_bp[:, None, :, None]).to(mask.device)
        missing = mask & ~have & causal
        if bool(missing.any()):
            rows, _, queries, _ = missing.nonzero(as_tuple=True)
            raise MissingSourceError(_describe_missing(
                self.name, hook, rows, hook.positions[rows, queries], "query position", self.num_positions))
        return torch.where(mask & have, values.to(device=activation.device, dtype=activation.dtype), activation)


class _EntryTable:
    """Cache-entry hooks [b, g, k, ...]: the source value of every (row, KV head, entry position)."""

    def __init__(self, name: str, calls: list):
        self.name = name
        self.num_positions = 1 + max(int(c.key_positions.max()) for c in calls)
        first = calls[0].activation
        b, g = first.shape[:2]
        t = max(self.num_positions, 1)
        self.values_bgt = first.new_zeros((b, g, t, *first.shape[3:]))
        self.have_bgt = torch.zeros((b, g, t), dtype=torch.bool, device=first.device)
        for call in calls:
            rows, heads, entries = (call.key_positions >= 0).nonzero(as_tuple=True)
            positions = call.key_positions[rows, heads, entries]
            self.values_bgt[rows, heads, positions] = call.activation[rows, heads, entries]
            self.have_bgt[rows, heads, positions] = True

    def patch(self, activation: torch.Tensor, hook, mask: torch.Tensor) -> torch.Tensor:
        device = self.values_bgt.device
        b, g = activation.shape[:2]
        key_positions_bgk = hook.key_positions.to(device)
        rows_b11 = _source_rows(self.values_bgt.shape[0], b, self.name, device)[:, None, None]
        heads_1g1 = torch.arange(g, device=device)[None, :, None]
        index_bgk = key_positions_bgk.clamp(min=0, max=self.values_bgt.shape[2] - 1)
        have_bgk = self.have_bgt[rows_b11, heads_1g1, index_bgk] & (key_positions_bgk < self.num_positions)
        values = self.values_bgt[rows_b11, heads_1g1, index_bgk]
        have = _along(have_bgk, activation.ndim, (0, 1, 2)).to(mask.device)
        missing = mask & ~have
        if bool(missing.any()):
            rows, heads, entries = missing.reshape(missing.shape[:3]).nonzero(as_tuple=True)
            raise MissingSourceError(_describe_missing(
                self.name, hook, rows, hook.key_positions[rows, heads, entries], "entry position",
                self.num_positions))
        return torch.where(mask, values.to(device=activation.device, dtype=activation.dtype), activation)


class _StepTable:
    """Compression-policy hooks have no token axis: aligned by decode step, shapes must match."""

    def __init__(self, name: str, calls: list):
        self.name = name
        self.by_step = {call.step: call.activation for call in calls}

    def patch(self, activation: torch.Tensor, hook, mask: torch.Tensor) -> torch.Tensor:
        source = self.by_step.get(hook.step)
        if source is None:
            raise MissingSourceError(
                f"the source recording has no call of {self.name!r} at step {hook.step} (a policy hook is aligned "
                f"by step; it has steps {sorted(self.by_step)})"
            )
        if source.shape != activation.shape:
            raise ValueError(
                f"the source {self.name!r} at step {hook.step} has shape {tuple(source.shape)}; the target's is "
                f"{tuple(activation.shape)} (policy hooks are patched whole, step by step)"
            )
        return torch.where(mask, source.to(device=activation.device, dtype=activation.dtype), activation)


_TABLES = {"tokens": _TokenTable, "keyed": _KeyedTable, "entries": _EntryTable, "policy": _StepTable}


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
        return self.table.patch(activation, hook, mask)

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
        calls = recording[name]
        selection.check(name, calls[0].activation)  # fail before the target runs, not in the middle of it
        table = _TABLES[hook_kind(name)](name, calls)
        hooks.append((name, SourceHook(table, selection)))
    return hooks
