"""Recording hook activations across cached decoding: one entry per hook call, with step and positions.

`with model.record(names_filter) as rec: model.generate(...)` keeps, for every hook call, the activation
(a detached copy on `device`, floats optionally cast to `dtype`) with the decode step, the true positions
and padding of the forward's tokens and, for cache and attention hooks, the positions of the entries
read. The verifier's localization and user recordings are this one mechanism.

What a recording offers on top of the per-call entries `rec[name]`:

- `rec.stacked(name)`: prefill, prompt chunks and decode steps stitched into one tensor over the whole
  sequence, aligned by *absolute position* (see `Recording.stacked` for the NaN rule);
- `rec.nbytes` and `recording_bytes_bound(...)` (`memory.py`): what a recording costs, and what it will
  cost before running it;
- `rec.save(path)` / `Recording.load(path)` (`recording_files.py`): a bitwise round trip through
  safetensors plus a JSON manifest that carries a checksum and each hook's layout.

Each hook's layout (`rec.layout(name)`) is the one its hook point declares: nothing here reads a layout
off a hook's name.

Every stored tensor is one the model never writes again: a copy -- the cache changes its storage in
place (rewind, eviction), and a recording must keep what the hook saw -- except the scores, patterns and
biases the attention core forms for one forward (`[b, h, p, k]`, the largest activations), which nothing
writes after their hook: those are kept by reference, and a write to one before the forward completes
(a hook attached after the recording started, editing in place) raises `RecordingError`.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch

from interp_cache.analysis.alignment import INTEGER_DTYPES, KeyedTable, TokenTable
from interp_cache.analysis.recording_files import load_recording, save_recording
from interp_cache.core.hook_layout import HookKind, HookLayout
from interp_cache.core.hook_points import tensor_version

_METADATA_MEMO_PER_SHAPE = 64  # distinct metadata tensors of one shape compared against per step


class RecordingError(RuntimeError):
    """A recorded activation changed after the recording saw it."""


@dataclass
class RecordedCall:
    step: int
    positions: torch.Tensor  # [b, p] true positions of the forward's tokens
    is_padding: torch.Tensor  # [b, p]
    key_positions: torch.Tensor | None  # [b, g, k] positions of the entries read (cache/attention hooks)
    activation: torch.Tensor


class Recording:
    def __init__(self, names_filter=None, device: str | torch.device = "cpu", dtype: torch.dtype | None = None):
        self.names_filter = as_filter(names_filter)
        self.device = device
        self._device = torch.device(device)
        self.dtype = dtype
        self.calls: dict[str, list[RecordedCall]] = {}
        self.order: list[str] = []  # hook names in the order they first fired: model order
        self.layouts: dict[str, HookLayout] = {}  # each hook's layout, as its hook point declares it
        self.layers: dict[str, int | None] = {}  # each hook's layer (None outside the blocks)
        # Integer metadata (positions, padding, key positions) repeats across the hooks and layers of one
        # forward; equal values are stored once per step. Keyed by (dtype, shape).
        self._metadata_memo: dict[tuple, list[torch.Tensor]] = {}
        # Most hooks of a forward are handed the very same metadata tensors (the forward's positions, a
        # layer's key positions): those are kept once, by identity, unless they were edited in place since.
        self._kept_by_source: dict[int, tuple[torch.Tensor, int | None, torch.Tensor]] = {}
        # Scores, patterns and biases the attention core formed for this forward are kept by reference (they
        # are the largest activations, [b, h, p, k], and nothing writes them after the hook); each with its
        # version, checked when the forward completes.
        self._borrowed: list[tuple[str, torch.Tensor, int]] = []
        self._memo_step: int | None = None
        # A run that raised leaves the recording partial: the steps whose forward completed, and why it stopped.
        self.partial = False
        self.interrupted_by: str | None = None
        self._last_step_seen: int | None = None
        self._complete_through: int | None = None  # the last step whose forward completed

    def __getitem__(self, name: str) -> list[RecordedCall]:
        if name not in self.calls:
            recorded = ", ".join(self.order[:8]) + (", ..." if len(self.order) > 8 else "")
            raise KeyError(f"no calls of {name!r} were recorded; recorded hooks: {recorded or 'none'}")
        return self.calls[name]

    def __contains__(self, name: str) -> bool:
        return name in self.calls

    def __repr__(self) -> str:
        num_calls = sum(len(calls) for calls in self.calls.values())
        partial = f", partial: steps <= {self._complete_through} kept, {self.interrupted_by}" if self.partial else ""
        return f"Recording(hooks={len(self.order)}, calls={num_calls}, nbytes={self.nbytes}{partial})"

    def names(self) -> list[str]:
        return list(self.order)

    def layout(self, name: str) -> HookLayout:
        self[name]  # an unrecorded name raises, listing the recorded ones
        return self.layouts[name]

    # -- recording -----------------------------------------------------------------------------------
    def hook(self, activation: torch.Tensor, hook) -> None:
        self._last_step_seen = hook.step
        if hook.step != self._memo_step:
            self._forget_memo()
            self._memo_step = hook.step
        if hook.name not in self.calls:
            self.calls[hook.name] = []
            self.order.append(hook.name)
            self.layouts[hook.name] = hook.layout
            self.layers[hook.name] = hook.layer_idx
        key_positions = None if hook.key_positions is None else self._keep_metadata(hook.key_positions)
        self.calls[hook.name].append(RecordedCall(
            hook.step, self._keep_metadata(hook.positions), self._keep_metadata(hook.is_padding), key_positions,
            self._keep_activation(activation, hook),
        ))

    def _keep_activation(self, activation: torch.Tensor, hook) -> torch.Tensor:
        version = tensor_version(activation)
        borrowable = (hook.layout.kind is HookKind.KEYED and version is not None and activation.is_contiguous()
                      and self._device == activation.device
                      and (self.dtype is None or not activation.is_floating_point() or self.dtype == activation.dtype))
        if not borrowable:
            return self._keep(activation)
        kept = activation.detach()  # shares the version counter: an in-place write is seen
        self._borrowed.append((hook.name, kept, version))
        return kept

    def _forward_completed(self) -> None:
        borrowed, self._borrowed = self._borrowed, []
        for name, kept, version in borrowed:
            if tensor_version(kept) != version:
                raise RecordingError(
                    f"{name!r} was written in place after the recording saw it (a hook attached after "
                    "model.record() edited it, or the model did), so the recording no longer holds what it saw; "
                    "attach editing hooks before the recording starts, or return an edited copy from the hook"
                )
        if self._last_step_seen is not None:
            self._complete_through = self._last_step_seen

    def _stop_partial(self, error: BaseException) -> None:
        """Keep the calls of forwards that completed; those of the forward that raised are dropped."""
        self._borrowed = []
        self.partial = True
        self.interrupted_by = f"interrupted by {type(error).__name__}: {error}"
        last = -1 if self._complete_through is None else self._complete_through
        for name in list(self.order):
            self.calls[name] = [call for call in self.calls[name] if call.step <= last]
            if not self.calls[name]:
                del self.calls[name], self.layouts[name], self.layers[name]
                self.order.remove(name)

    def _keep(self, tensor: torch.Tensor) -> torch.Tensor:
        dtype = self.dtype if self.dtype is not None and tensor.is_floating_point() else tensor.dtype
        if dtype == tensor.dtype and self._device == tensor.device:
            kept = tensor.detach().clone(memory_format=torch.contiguous_format)
        else:
            kept = tensor.detach().to(device=self.device, dtype=dtype, copy=True, memory_format=torch.contiguous_format)
        if kept.is_floating_point() or kept.is_complex():
            return kept
        bucket = self._metadata_memo.setdefault((kept.dtype, tuple(kept.shape)), [])
        for earlier in bucket:
            if torch.equal(earlier, kept):
                return earlier
        bucket.append(kept)
        if len(bucket) > _METADATA_MEMO_PER_SHAPE:
            del bucket[0]
        return kept

    def _keep_metadata(self, tensor: torch.Tensor) -> torch.Tensor:
        source, version, kept = self._kept_by_source.get(id(tensor), (None, None, None))
        if source is tensor and version is not None and tensor_version(tensor) == version:
            return kept
        kept = self._keep(tensor)
        self._kept_by_source[id(tensor)] = (tensor, tensor_version(tensor), kept)
        return kept

    def _forget_memo(self) -> None:
        self._metadata_memo.clear()
        self._kept_by_source.clear()
        self._memo_step = None

    # -- what a recording holds ----------------------------------------------------------------------
    def _tensors(self) -> Iterator[torch.Tensor]:
        for name in self.order:
            for call in self.calls[name]:
                yield call.positions
                yield call.is_padding
                if call.key_positions is not None:
                    yield call.key_positions
                yield call.activation

    @property
    def nbytes(self) -> int:
        """Bytes of every distinct tensor storage the recording holds (shared metadata counted once)."""
        seen: set[tuple[str, int]] = set()
        total = 0
        for tensor in self._tensors():
            storage = tensor.untyped_storage()
            key = (str(tensor.device), storage.data_ptr())
            if storage.nbytes() == 0 or key in seen:
                continue
            seen.add(key)
            total += storage.nbytes()
        return total

    # -- one full-sequence tensor --------------------------------------------------------------------
    def stacked(self, name: str) -> torch.Tensor:
        """Every recorded call of `name` stitched into one tensor over absolute positions `0 .. T-1`.

        T is one more than the largest real (non-padding) position recorded in any row. Calls are placed
        by the absolute positions of their tokens, not by token slot, so prefill, chunked prefill and
        decode steps of a left-padded batch line up with one uncached forward over the same tokens
        (`interp_cache.analysis.alignment`).

        - Per-token hooks (`hook_resid_post` `[b, p, m]`, `hook_q` `[b, p, h, d]`, `hook_k_write`
          `[b, g, p, d]`, ...): the token axis becomes T; entry t is the activation of row r's real
          token at position t. Padding tokens are dropped.
        - Keyed hooks (`hook_attn_scores`, `hook_pattern`, `hook_pos_bias`, `[b, h, p, k]`) become
          `[b, h, T, T]`: query row = the query token's position, key column = the position of the cache
          entry read (`key_positions`, KV heads repeated to query heads). An entry is *defined* for query
          position q iff its key position is >= 0 and <= q; there it holds whatever the hook saw -- a
          sliding window's out-of-window entries are defined and hold the core's 0 (pattern) or masked
          score, a real attention value. Everything else was never attended and is NaN: the causal future,
          padding, entries evicted from the cache or not selected by a page-selection policy (they are
          absent from that step's key positions), and the -1 holes of head-wise eviction.

        Undefined entries are NaN for floating-point hooks and -1 for integer hooks (`hook_position_ids`).
        Cache-entry hooks (`hook_k_read`, `hook_v_read`, `hook_positions`) and policy hooks (`hook_scores`,
        `hook_keep`) run over stored entries, not tokens, and cannot be stacked: read `rec[name]`.

        A recording that saw the same position of a row twice (two runs, a rewind and replay, beam search
        with a different batch) is ambiguous and raises; record each sequence separately.
        """
        calls = self[name]
        layout = self.layouts[name]
        if layout.kind in (HookKind.ENTRIES, HookKind.POLICY):
            kind = "cache-entry" if layout.kind is HookKind.ENTRIES else "compression-policy"
            raise ValueError(
                f"{name!r} is a {kind} hook: its axis runs over stored cache entries, not tokens, so it has no "
                f"single token axis to stack along. stacked() accepts per-token hooks (hook_embed, hook_resid_post, "
                f"hook_q, hook_z, hook_k_write, ...) and keyed hooks (hook_pos_bias, hook_attn_scores, hook_pattern); "
                f"read rec[{name!r}] for the per-step entries"
            )
        dtype = calls[0].activation.dtype
        if not (dtype.is_floating_point or dtype in INTEGER_DTYPES):
            raise ValueError(f"{name!r} has dtype {dtype}; stacked() accepts floating-point or integer activations")
        batch = calls[0].positions.shape[0]
        for call in calls:
            if call.positions.shape[0] != batch or call.activation.shape[0] != batch:
                raise ValueError(
                    f"{name!r} was recorded with batch sizes {calls[0].positions.shape[0]} and "
                    f"{call.positions.shape[0]} (step {call.step}); stacked() needs one batch throughout -- record "
                    f"each run separately"
                )
        if layout.kind is HookKind.KEYED:
            return KeyedTable(name, calls, strict=True).stacked()
        return TokenTable(name, calls, layout.token_axis, strict=True).stacked()

    # -- files ---------------------------------------------------------------------------------------
    def save(self, path: str | os.PathLike) -> None:
        """Write the recording to the directory `path`: safetensors plus a checksummed manifest (`save_recording`)."""
        save_recording(self, path)

    @classmethod
    def load(cls, path: str | os.PathLike, device: str | torch.device = "cpu") -> Recording:
        """Read a recording written by `save`; a damaged or inconsistent file raises `RecordingFileError`."""
        loaded = load_recording(path, device)
        recording = cls(None, device=device, dtype=loaded.record_dtype)
        recording.order = loaded.order
        recording.layouts, recording.layers = loaded.layouts, loaded.layers
        recording.calls = {name: [RecordedCall(**call) for call in calls] for name, calls in loaded.calls.items()}
        recording.partial, recording.interrupted_by = loaded.partial is not None, loaded.partial
        return recording


def check_names(model, names_filter) -> None:
    """A hook name given by string that the model does not have is a typo, not a wish to record nothing."""
    if names_filter is None or callable(names_filter):
        return
    for name in [names_filter] if isinstance(names_filter, str) else list(names_filter):
        model.hook_point(name)


def as_filter(names_filter) -> Callable[[str], bool]:
    if names_filter is None:
        return lambda name: True
    if isinstance(names_filter, str):
        return lambda name: name == names_filter
    if callable(names_filter):
        return names_filter
    names = set(names_filter)
    return lambda name: name in names


@contextlib.contextmanager
def record(model, names_filter=None, device="cpu", dtype=None) -> Iterator[Recording]:
    """Attach a recording hook to every matching hook point for the duration of the block. If the block
    raises, the recording keeps the steps whose forward completed and says it is partial
    (`recording.partial`, `recording.interrupted_by`); the error propagates."""
    check_names(model, names_filter)
    recording = Recording(names_filter, device=device, dtype=dtype)
    completed = model.hf_model.register_forward_hook(lambda *args: recording._forward_completed())
    try:
        with model.hooks(fwd_hooks=[(recording.names_filter, recording.hook)]):
            yield recording
    except BaseException as error:
        recording._stop_partial(error)
        raise
    finally:
        completed.remove()
        recording._forget_memo()
