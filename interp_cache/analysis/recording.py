"""Recording hook activations across cached decoding: one entry per hook call, with step and positions.

`with model.record(names_filter) as rec: model.generate(...)` keeps, for every hook call, the activation
(a detached copy on `device`, floats optionally cast to `dtype`) with the decode step, the true positions
and padding of the forward's tokens and, for cache and attention hooks, the positions of the entries
read. The verifier's localization and user recordings are this one mechanism.

What a recording offers on top of the per-call entries `rec[name]`:

- `rec.stacked(name)`: prefill, prompt chunks and decode steps stitched into one tensor over the whole
  sequence, aligned by *absolute position* (see `Recording.stacked` for the NaN rule);
- `rec.nbytes` and `recording_bytes_bound(...)`: what a recording costs, and what it will cost before
  running it;
- `rec.save(path)` / `Recording.load(path)`: a bitwise round trip through safetensors plus a JSON manifest
  that carries a checksum, so a truncated or corrupted file is an error and never a partial recording.

Every stored tensor is a copy the model never writes again: the cache changes its storage in place
(rewind, eviction), and a recording must keep what the hook saw.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from interp_cache.core.attention import kv_to_query_heads

# Which axis of each hook's activation runs over this forward's new tokens (None: over cache entries).
KEYED_HOOKS = ("hook_pos_bias", "hook_attn_scores", "hook_pattern")  # [b, h, p, k]: new tokens x entries read
_QUERY_AXIS_2 = KEYED_HOOKS + ("hook_k_write", "hook_v_write")
_ENTRY_HOOKS = ("hook_k_read", "hook_v_read", "hook_positions")
_POLICY_HOOKS = ("hook_scores", "hook_keep")

FORMAT_NAME = "interp_cache.analysis.recording"
FORMAT_VERSION = 1
MANIFEST_FILE = "manifest.json"
TENSORS_FILE = "tensors.safetensors"

_INTEGER_FILL = -1  # what `stacked` puts where an integer hook has no token (positions are never -1)
_METADATA_MEMO_PER_SHAPE = 64  # distinct metadata tensors of one shape compared against per step


def _leaf(name: str) -> str:
    return name.rsplit(".", 1)[-1]


def is_policy_hook(name: str) -> bool:
    return _leaf(name) in _POLICY_HOOKS


def is_keyed_hook(name: str) -> bool:
    """`[b, h, p, k]` hooks: one row per new token, one column per cache entry read."""
    return _leaf(name) in KEYED_HOOKS


def position_axis(name: str) -> int | None:
    leaf = _leaf(name)
    if leaf in _ENTRY_HOOKS or leaf in _POLICY_HOOKS:
        return None
    return 2 if leaf in _QUERY_AXIS_2 else 1


def head_axis(name: str) -> int | None:
    leaf = _leaf(name)
    if leaf in ("hook_q", "hook_k", "hook_v", "hook_rot_q", "hook_rot_k", "hook_z"):
        return 2
    if leaf in _QUERY_AXIS_2 or leaf in _ENTRY_HOOKS:
        return 1
    return None


class RecordingFileError(ValueError):
    """A saved recording cannot be read back whole: missing, truncated, corrupted or inconsistent files."""


@dataclass
class RecordedCall:
    step: int
    positions: torch.Tensor  # [b, p] true positions of the forward's tokens
    is_padding: torch.Tensor  # [b, p]
    key_positions: torch.Tensor | None  # [b, g, k] positions of the entries read (cache/attention hooks)
    activation: torch.Tensor


class Recording:
    def __init__(self, names_filter=None, device: str | torch.device = "cpu", dtype: torch.dtype | None = None):
        self.names_filter = _as_filter(names_filter)
        self.device = device
        self.dtype = dtype
        self.calls: dict[str, list[RecordedCall]] = {}
        self.order: list[str] = []  # hook names in the order they first fired: model order
        # Integer metadata (positions, padding, key positions) repeats across the hooks and layers of one
        # forward; equal values are stored once per step. Keyed by (dtype, shape).
        self._metadata_memo: dict[tuple, list[torch.Tensor]] = {}
        self._memo_step: int | None = None

    def __getitem__(self, name: str) -> list[RecordedCall]:
        if name not in self.calls:
            recorded = ", ".join(self.order[:8]) + (", ..." if len(self.order) > 8 else "")
            raise KeyError(f"no calls of {name!r} were recorded; recorded hooks: {recorded or 'none'}")
        return self.calls[name]

    def __contains__(self, name: str) -> bool:
        return name in self.calls

    def __repr__(self) -> str:
        num_calls = sum(len(calls) for calls in self.calls.values())
        return f"Recording(hooks={len(self.order)}, calls={num_calls}, nbytes={self.nbytes})"

    def names(self) -> list[str]:
        return list(self.order)

    # -- recording -----------------------------------------------------------------------------------
    def hook(self, activation: torch.Tensor, hook) -> None:
        if hook.step != self._memo_step:
            self._metadata_memo.clear()
            self._memo_step = hook.step
        if hook.name not in self.calls:
            self.calls[hook.name] = []
            self.order.append(hook.name)
        key_positions = None if hook.key_positions is None else self._keep(hook.key_positions)
        self.calls[hook.name].append(RecordedCall(
            hook.step, self._keep(hook.positions), self._keep(hook.is_padding), key_positions, self._keep(activation),
        ))

    def _keep(self, tensor: torch.Tensor) -> torch.Tensor:
        dtype = self.dtype if self.dtype is not None and tensor.is_floating_point() else tensor.dtype
        kept = tensor.detach().to(
            device=self.device, dtype=dtype, copy=True, memory_format=torch.contiguous_format
        )
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

    def _forget_memo(self) -> None:
        self._metadata_memo.clear()
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
        decode steps of a left-padded batch line up with one uncached forward over the same tokens.

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
        if position_axis(name) is None:
            kind = "cache-entry" if _leaf(name) in _ENTRY_HOOKS else "compression-policy"
            raise ValueError(
                f"{name!r} is a {kind} hook: its axis runs over stored cache entries, not tokens, so it has no "
                f"single token axis to stack along. stacked() accepts per-token hooks (hook_embed, hook_resid_post, "
                f"hook_q, hook_z, hook_k_write, ...) and keyed hooks ({', '.join(KEYED_HOOKS)}); read rec[{name!r}] "
                f"for the per-step entries"
            )
        dtype = calls[0].activation.dtype
        if dtype.is_floating_point:
            fill = float("nan")
        elif dtype in (torch.int8, torch.int16, torch.int32, torch.int64):
            fill = _INTEGER_FILL
        else:
            raise ValueError(f"{name!r} has dtype {dtype}; stacked() accepts floating-point or integer activations")
        batch = calls[0].positions.shape[0]
        for call in calls:
            if call.positions.shape[0] != batch or call.activation.shape[0] != batch:
                raise ValueError(
                    f"{name!r} was recorded with batch sizes {calls[0].positions.shape[0]} and "
                    f"{call.positions.shape[0]} (step {call.step}); stacked() needs one batch throughout -- record "
                    f"each run separately"
                )
        real_positions = [call.positions[~call.is_padding] for call in calls]
        length = max((int(p.max()) + 1 for p in real_positions if p.numel()), default=0)
        if is_keyed_hook(name):
            return _stack_keyed(name, calls, length, fill)
        return _stack_per_token(name, calls, position_axis(name), length, fill)

    # -- files ---------------------------------------------------------------------------------------
    def save(self, path: str | os.PathLike) -> None:
        """Write the recording to the directory `path` (created if missing): two files, see `Recording.load`.

        Tensors shared between calls (metadata stored once per step) are written once and shared again
        on load. The tensors file is written first and the manifest, which carries its checksum, last --
        each through a temporary file and an atomic rename -- so an interrupted save never leaves a
        manifest that vouches for a file it does not describe.
        """
        from safetensors.torch import save_file

        directory = Path(path)
        directory.mkdir(parents=True, exist_ok=True)
        tensors: dict[str, torch.Tensor] = {}
        key_of: dict[int, str] = {}
        storages: set[tuple[str, int]] = set()

        def key_for(tensor: torch.Tensor) -> str:
            if id(tensor) in key_of:
                return key_of[id(tensor)]
            stored = tensor.detach().to("cpu").contiguous()
            storage = (str(stored.device), stored.untyped_storage().data_ptr())
            if stored.numel() and storage in storages:  # safetensors refuses tensors that share memory
                stored = stored.clone()
            storages.add((str(stored.device), stored.untyped_storage().data_ptr()))
            key = f"t{len(tensors)}"
            tensors[key] = stored
            key_of[id(tensor)] = key
            return key

        calls_manifest = {}
        for name in self.order:
            calls_manifest[name] = [
                {
                    "step": int(call.step),
                    "positions": key_for(call.positions),
                    "is_padding": key_for(call.is_padding),
                    "key_positions": None if call.key_positions is None else key_for(call.key_positions),
                    "activation": key_for(call.activation),
                }
                for call in self.calls[name]
            ]
        tensors_path = directory / TENSORS_FILE
        manifest_path = directory / MANIFEST_FILE
        temporary_tensors = directory / (TENSORS_FILE + ".tmp")
        save_file(tensors, str(temporary_tensors))
        manifest = {
            "format": FORMAT_NAME,
            "version": FORMAT_VERSION,
            "tensors_file": TENSORS_FILE,
            "tensors_bytes": temporary_tensors.stat().st_size,
            "tensors_sha256": _sha256(temporary_tensors),
            "record_device": str(self.device),
            "record_dtype": None if self.dtype is None else _dtype_name(self.dtype),
            "order": list(self.order),
            "tensors": {key: {"dtype": _dtype_name(t.dtype), "shape": list(t.shape)} for key, t in tensors.items()},
            "calls": calls_manifest,
        }
        os.replace(temporary_tensors, tensors_path)
        temporary_manifest = directory / (MANIFEST_FILE + ".tmp")
        temporary_manifest.write_text(json.dumps(manifest, indent=1))
        os.replace(temporary_manifest, manifest_path)

    @classmethod
    def load(cls, path: str | os.PathLike, device: str | torch.device = "cpu") -> Recording:
        """Read a recording written by `save`: the directory `path` holding two files.

        - `manifest.json`: `format` ("interp_cache.analysis.recording"), `version` (1), `tensors_file`,
          `tensors_bytes` and `tensors_sha256` (size and SHA-256 of the tensors file), `record_device`,
          `record_dtype`, `order` (hook names in model order), `tensors` (key -> dtype and shape) and
          `calls` (hook name -> list of {step, positions, is_padding, key_positions (or null),
          activation}, each a tensor key).
        - `tensors.safetensors`: every tensor under its key, bit for bit as recorded.

        The whole tensors file is checked against size and checksum, and every tensor against the
        manifest, before anything is returned; any mismatch raises `RecordingFileError` naming the file.
        """
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        directory = Path(path)
        manifest_path = directory / MANIFEST_FILE
        if not directory.is_dir():
            raise RecordingFileError(f"{directory}: no recording here (expected a directory holding "
                                     f"{MANIFEST_FILE} and {TENSORS_FILE}, as Recording.save writes)")
        if not manifest_path.is_file():
            raise RecordingFileError(f"{manifest_path}: missing; a saved recording has {MANIFEST_FILE} and {TENSORS_FILE}")
        try:
            manifest = json.loads(manifest_path.read_text())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
            raise RecordingFileError(f"{manifest_path}: not a readable JSON manifest ({error})") from None
        _check_manifest_header(manifest_path, manifest)

        tensors_path = directory / manifest["tensors_file"]
        if not tensors_path.is_file():
            raise RecordingFileError(f"{tensors_path}: missing; the manifest {manifest_path} refers to it")
        size, expected_size = tensors_path.stat().st_size, manifest["tensors_bytes"]
        if size != expected_size:
            what = "truncated" if size < expected_size else "longer than written"
            raise RecordingFileError(f"{tensors_path}: {what}: {size} bytes, the manifest records {expected_size}")
        if _sha256(tensors_path) != manifest["tensors_sha256"]:
            raise RecordingFileError(
                f"{tensors_path}: corrupted: its SHA-256 differs from the one {manifest_path} records"
            )
        try:
            tensors = load_file(str(tensors_path), device=str(device))
        except (SafetensorError, OSError, RuntimeError, ValueError) as error:
            raise RecordingFileError(f"{tensors_path}: not a readable safetensors file ({error})") from None
        _check_tensors(tensors_path, manifest_path, manifest["tensors"], tensors)

        record_dtype = None if manifest["record_dtype"] is None else _parse_dtype(manifest_path, manifest["record_dtype"])
        recording = cls(None, device=device, dtype=record_dtype)
        recording.order = list(manifest["order"])
        for name in recording.order:
            recording.calls[name] = [
                _call_from_manifest(manifest_path, name, index, entry, tensors)
                for index, entry in enumerate(manifest["calls"][name])
            ]
        return recording


# -- stitching ---------------------------------------------------------------------------------------
def _stack_per_token(name: str, calls: list[RecordedCall], axis: int, length: int, fill) -> torch.Tensor:
    first = calls[0].activation
    rest = [size for dim, size in enumerate(first.shape) if dim not in (0, axis)]
    batch = first.shape[0]
    stacked_btr = first.new_full((batch, length, *rest), fill)
    written_bt = torch.zeros(batch, length, dtype=torch.bool, device=first.device)
    for call in calls:
        activation_bpr = call.activation.movedim(axis, 1)
        if list(activation_bpr.shape[2:]) != rest:
            raise ValueError(
                f"{name!r} changes shape between calls ({tuple(first.shape)} at step {calls[0].step}, "
                f"{tuple(call.activation.shape)} at step {call.step}); stacked() needs equal non-token axes"
            )
        rows, slots = (~call.is_padding).nonzero(as_tuple=True)
        positions = call.positions[rows, slots]
        _claim(name, written_bt, (rows, positions), call.step)
        stacked_btr[rows, positions] = activation_bpr[rows, slots]
    return stacked_btr.movedim(1, axis).contiguous()


def _stack_keyed(name: str, calls: list[RecordedCall], length: int, fill) -> torch.Tensor:
    first = calls[0].activation
    batch, heads = first.shape[:2]
    stacked_bhqk = first.new_full((batch, heads, length, length), fill)
    written_bhqk = torch.zeros(batch, heads, length, length, dtype=torch.bool, device=first.device)
    for call in calls:
        activation_bhpk = call.activation
        key_positions_bgk = call.key_positions
        if key_positions_bgk is None:
            raise ValueError(f"{name!r} step {call.step} was recorded without key positions; cannot place its columns")
        g = key_positions_bgk.shape[1]
        if activation_bhpk.shape[1] != heads or heads % g or activation_bhpk.shape[-1] != key_positions_bgk.shape[-1]:
            raise ValueError(
                f"{name!r} step {call.step}: activation {tuple(activation_bhpk.shape)} does not fit key positions "
                f"{tuple(key_positions_bgk.shape)} (expected [b, {heads}, p, k] with [b, g, k], {heads} divisible by g)"
            )
        key_positions_bhk = kv_to_query_heads(key_positions_bgk, heads)
        query_positions_bp = call.positions
        keys_bh1k = key_positions_bhk[:, :, None, :]
        defined_bhpk = (
            (~call.is_padding)[:, None, :, None]
            & (keys_bh1k >= 0)
            & (keys_bh1k <= query_positions_bp[:, None, :, None])
        )
        rows, head, slots, entries = defined_bhpk.nonzero(as_tuple=True)
        index = (rows, head, query_positions_bp[rows, slots], key_positions_bhk[rows, head, entries])
        _claim(name, written_bhqk, index, call.step)
        stacked_bhqk[index] = activation_bhpk[rows, head, slots, entries]
    return stacked_bhqk


def _claim(name: str, written: torch.Tensor, index: tuple[torch.Tensor, ...], step: int) -> None:
    """Mark `index` as filled. A place filled twice is ambiguous, and says where the second value came from."""
    strides = torch.tensor(written.stride(), device=written.device)
    flat = (torch.stack(index, dim=-1) * strides).sum(-1) if index[0].numel() else index[0]
    _, inverse, counts = flat.unique(return_inverse=True, return_counts=True)
    if bool((counts > 1).any()):
        first = int((counts[inverse] > 1).nonzero()[0, 0])
        place = [int(axis[first]) for axis in index]
        if len(place) == 4:
            row, head, query, key = place
            what = (f"row {row} head {head}: the query at position {query} read two cache entries at key position "
                    f"{key}; the cache holds one position twice")
        else:
            what = f"row {place[0]} has two tokens at position {place[1]} in one forward"
        raise ValueError(f"{name!r} step {step}: {what}, so the stitched tensor would be ambiguous")
    clash = written[index]
    if bool(clash.any()):
        first = int(clash.nonzero()[0, 0])
        row, position = int(index[0][first]), int(index[-2 if len(index) == 4 else -1][first])
        raise ValueError(
            f"{name!r}: row {row} position {position} was recorded more than once (again at step {step}); the "
            f"recording spans several passes over the sequence (two runs, a rewind, beam search). Record each "
            f"sequence separately, or read the per-step entries rec[{name!r}]"
        )
    written[index] = True


# -- memory ------------------------------------------------------------------------------------------
def generation_forward_lengths(prompt_length: int, max_new_tokens: int) -> list[int]:
    """Token slots each forward of `generate(max_new_tokens=N)` feeds: the prompt, then N-1 single tokens.

    The last generated token is chosen but never fed, so N new tokens cost N forwards (and 0 cost none:
    `generate` returns the prompt without running the model).
    """
    if prompt_length < 1 or max_new_tokens < 0:
        raise ValueError(f"need prompt_length >= 1 and max_new_tokens >= 0; got {prompt_length}, {max_new_tokens}")
    if max_new_tokens == 0:
        return []
    return [prompt_length] + [1] * (max_new_tokens - 1)


def recording_bytes_bound(
    model,
    batch_size: int,
    forward_lengths: Sequence[int],
    names_filter=None,
    dtype: torch.dtype | None = None,
    include_policy_hooks: bool = False,
) -> int:
    """Upper bound on `rec.nbytes` for recording `names_filter` over forwards of `forward_lengths` slots.

    Forward s feeds p_s token slots (padding included) for `batch_size` = b rows and reads
    k_s = p_1 + ... + p_s cache entries (a compressed cache reads fewer, so the bound still holds). With
    e the element size of recorded floats (`dtype`, else the model's; a family's score dtype for scores
    and ALiBi bias), m the hidden width, h query heads, g KV heads, d the head dim, L layers:

        bytes = sum_s [ b*p_s*(8 + 1)                          positions (int64) + padding flags (bool)
                      + sum_{per-token hooks} b*p_s*w*e         w = m (embed, resid, attn_out),
                                                                    h*d (q, rot_q, z), g*d (k, v, rot_k, k/v_write)
                      + sum_layers [ b*g*k_s*8                  key positions (int64)
                                   + n_read * b*g*k_s*d*e       hook_k_read, hook_v_read
                                   + n_keyed * b*h*p_s*k_s*e ]  hook_attn_scores, hook_pattern, hook_pos_bias
                      ]

    Both cache reads and keyed hooks grow quadratically over a generation (sum_s k_s and sum_s p_s*k_s);
    which dominates depends on d versus h*p_s: keyed hooks dominate a long prefill, reads the decode
    steps when d > h. For generate with a prompt of P slots and N new tokens, `forward_lengths` is
    `generation_forward_lengths(P, N)` = [P, 1, ..., 1] and sum_s p_s*k_s = P^2 + (P+1) + ... + (P+N-1).

    `hook_position_ids` and `hook_positions` repeat the positions and key positions every call stores and
    cost nothing extra; the bound counts key positions once per layer, where the recording keeps equal
    key positions of different layers once, so it exceeds the measured bytes by about b*g*k_s*8*(L-1)
    per step. Policy hooks (`hook_scores` float, `hook_keep` int64, each at most b*g*k_s per layer and
    step) fire only while a compression policy runs; count them with `include_policy_hooks=True`.
    """
    _check_names(model, names_filter)
    matches = _as_filter(names_filter)
    names = [name for name in model.hook_dict if matches(name)]
    if not names:
        return 0
    float_size = torch.empty((), dtype=dtype if dtype is not None else model.dtype).element_size()
    adapter, hf_model = model.adapter, model.hf_model
    widths = {"hook_embed": _embedding_width(adapter.token_embedding(hf_model))}
    if adapter.learned_positions:
        widths["hook_pos_embed"] = _embedding_width(adapter.position_embedding(hf_model))
    hidden = model.config.hidden_size

    token_elements = 0  # float elements per token slot, over all matching per-token hooks
    read_elements = 0  # float elements per entry read, over all matching cache-read hooks
    keyed_bytes = 0  # bytes per (query slot x entry read), over all matching keyed hooks
    policy_bytes = 0  # bytes per entry read, over all matching policy hooks
    layers_with_keys: set[int] = set()
    for name in names:
        leaf = _leaf(name)
        layer = model.hook_dict[name].layer_idx
        spec = model.runners[layer].spec if layer is not None else None
        if spec is not None and (leaf in KEYED_HOOKS or leaf in _ENTRY_HOOKS or leaf in _POLICY_HOOKS):
            layers_with_keys.add(layer)
        if leaf in widths:
            token_elements += widths[leaf]
        elif leaf == "hook_position_ids" or leaf == "hook_positions":
            continue  # equal to the stored positions / key positions: kept once
        elif leaf in ("hook_resid_pre", "hook_resid_post", "hook_attn_out"):
            token_elements += hidden
        elif leaf in ("hook_q", "hook_rot_q", "hook_z"):
            token_elements += spec.num_heads * spec.head_dim
        elif leaf in ("hook_k", "hook_v", "hook_rot_k", "hook_k_write", "hook_v_write"):
            token_elements += spec.num_kv_heads * spec.head_dim
        elif leaf in ("hook_k_read", "hook_v_read"):
            read_elements += spec.num_kv_heads * spec.head_dim
        elif leaf in KEYED_HOOKS:
            size = float_size
            if dtype is None and spec.score_dtype is not None and leaf != "hook_pattern":
                size = torch.empty((), dtype=spec.score_dtype).element_size()
            keyed_bytes += spec.num_heads * size
        elif leaf in _POLICY_HOOKS:
            if include_policy_hooks:
                policy_bytes += spec.num_kv_heads * (float_size if leaf == "hook_scores" else 8)
        else:
            raise ValueError(f"recording_bytes_bound does not know the size of hook {name!r}")
    key_position_bytes = sum(model.runners[layer].spec.num_kv_heads * 8 for layer in layers_with_keys)

    total, entries = 0, 0
    for p in forward_lengths:
        entries += p
        total += batch_size * p * (8 + 1)
        total += batch_size * p * token_elements * float_size
        total += batch_size * entries * (key_position_bytes + read_elements * float_size + policy_bytes)
        total += batch_size * p * entries * keyed_bytes
    return total


def _embedding_width(module) -> int:
    return module.embedding_dim if hasattr(module, "embedding_dim") else module.weight.shape[-1]


# -- files -------------------------------------------------------------------------------------------
def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _parse_dtype(manifest_path: Path, name) -> torch.dtype:
    dtype = getattr(torch, name, None) if isinstance(name, str) else None
    if not isinstance(dtype, torch.dtype):
        raise RecordingFileError(f"{manifest_path}: unknown dtype {name!r}")
    return dtype


_MANIFEST_FIELDS = {
    "tensors_file": str, "tensors_bytes": int, "tensors_sha256": str, "order": list, "tensors": dict, "calls": dict,
}


def _check_manifest_header(manifest_path: Path, manifest) -> None:
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT_NAME:
        raise RecordingFileError(f"{manifest_path}: not an interp_cache recording manifest (format != {FORMAT_NAME!r})")
    if manifest.get("version") != FORMAT_VERSION:
        raise RecordingFileError(
            f"{manifest_path}: format version {manifest.get('version')!r}; this interp_cache reads version {FORMAT_VERSION}"
        )
    for field, kind in _MANIFEST_FIELDS.items():
        if not isinstance(manifest.get(field), kind):
            raise RecordingFileError(f"{manifest_path}: field {field!r} is missing or not a {kind.__name__}")
    if "record_dtype" not in manifest:
        raise RecordingFileError(f"{manifest_path}: field 'record_dtype' is missing")
    if Path(manifest["tensors_file"]).name != manifest["tensors_file"]:
        raise RecordingFileError(f"{manifest_path}: tensors_file must be a file name in the same directory")
    if set(manifest["order"]) != set(manifest["calls"]) or len(manifest["order"]) != len(manifest["calls"]):
        raise RecordingFileError(f"{manifest_path}: 'order' and 'calls' name different hooks")


def _check_tensors(tensors_path: Path, manifest_path: Path, described: dict, tensors: dict) -> None:
    missing = sorted(set(described) - set(tensors))
    extra = sorted(set(tensors) - set(described))
    if missing or extra:
        raise RecordingFileError(
            f"{tensors_path} does not match {manifest_path}: tensors missing from the file {missing[:5]}, "
            f"not in the manifest {extra[:5]}"
        )
    for key, description in described.items():
        if not isinstance(description, dict) or "dtype" not in description or "shape" not in description:
            raise RecordingFileError(f"{manifest_path}: tensor {key!r} needs a dtype and a shape")
        tensor = tensors[key]
        if _dtype_name(tensor.dtype) != description["dtype"] or list(tensor.shape) != description["shape"]:
            raise RecordingFileError(
                f"{tensors_path}: tensor {key!r} is {_dtype_name(tensor.dtype)} {list(tensor.shape)}; "
                f"{manifest_path} records {description['dtype']} {description['shape']}"
            )


def _call_from_manifest(manifest_path: Path, name: str, index: int, entry, tensors: dict) -> RecordedCall:
    where = f"{manifest_path}: call {index} of {name!r}"
    if not isinstance(entry, dict) or not isinstance(entry.get("step"), int):
        raise RecordingFileError(f"{where}: needs an integer 'step' and tensor keys")

    def tensor(field: str, optional: bool = False):
        if field not in entry:
            raise RecordingFileError(f"{where}: field {field!r} is missing")
        key = entry[field]
        if key is None and optional:
            return None
        if key not in tensors:
            raise RecordingFileError(f"{where}: {field} refers to tensor {key!r}, which the file does not hold")
        return tensors[key]

    call = RecordedCall(
        entry["step"], tensor("positions"), tensor("is_padding"), tensor("key_positions", optional=True),
        tensor("activation"),
    )
    if call.positions.shape != call.is_padding.shape or call.positions.ndim != 2:
        raise RecordingFileError(
            f"{where}: positions {list(call.positions.shape)} and is_padding {list(call.is_padding.shape)} must be "
            f"equal [b, p] shapes"
        )
    return call


def _check_names(model, names_filter) -> None:
    """A hook name given by string that the model does not have is a typo, not a wish to record nothing."""
    if names_filter is None or callable(names_filter):
        return
    names = [names_filter] if isinstance(names_filter, str) else list(names_filter)
    unknown = [name for name in names if name not in model.hook_dict]
    if unknown:
        examples = ", ".join(list(model.hook_dict)[:4])
        raise ValueError(
            f"no hook point named {', '.join(map(repr, unknown))} in this {getattr(model, 'family', '')} model; "
            f"names are e.g. {examples}, ... (model.hook_dict lists them all), or pass a callable filter"
        )


def _as_filter(names_filter) -> Callable[[str], bool]:
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
    """Attach a recording hook to every matching hook point for the duration of the block."""
    _check_names(model, names_filter)
    recording = Recording(names_filter, device=device, dtype=dtype)
    try:
        with model.hooks(fwd_hooks=[(recording.names_filter, recording.hook)]):
            yield recording
    finally:
        recording._forget_memo()
