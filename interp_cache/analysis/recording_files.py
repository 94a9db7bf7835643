"""Recordings on disk: a bitwise round trip through safetensors plus a JSON manifest with a checksum.

A truncated, corrupted or inconsistent file is a `RecordingFileError` naming the file, never a partial
recording. The manifest keeps each hook's layout, so a loaded recording stitches and replays exactly as
the one that was saved.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import NamedTuple

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from interp_cache.core.hook_layout import HookLayout

FORMAT_NAME = "interp_cache.recording"
FORMAT_VERSION = 2  # 2: the manifest carries each hook's layout and layer
MANIFEST_FILE = "manifest.json"
TENSORS_FILE = "tensors.safetensors"


class RecordingFileError(ValueError):
    """A saved recording cannot be read back whole: missing, truncated, corrupted or inconsistent files."""


class LoadedRecording(NamedTuple):
    order: list[str]
    calls: dict[str, list[dict]]  # per hook, each call's step, positions, is_padding, key_positions, activation
    layouts: dict[str, HookLayout]
    layers: dict[str, int | None]
    record_dtype: torch.dtype | None
    partial: str | None  # why recording stopped early (the run raised), or None for a complete recording


def save_recording(recording, path: str | os.PathLike) -> None:
    """Write `recording` to the directory `path` (created if missing): two files, see `load_recording`.

    Tensors shared between calls (metadata stored once per step) are written once and shared again
    on load. The tensors file is written first and the manifest, which carries its checksum, last --
    each through a temporary file and an atomic rename -- so an interrupted save never leaves a
    manifest that vouches for a file it does not describe.
    """
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
    for name in recording.order:
        calls_manifest[name] = [
            {
                "step": int(call.step),
                "positions": key_for(call.positions),
                "is_padding": key_for(call.is_padding),
                "key_positions": None if call.key_positions is None else key_for(call.key_positions),
                "activation": key_for(call.activation),
            }
            for call in recording.calls[name]
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
        "record_device": str(recording.device),
        "record_dtype": None if recording.dtype is None else _dtype_name(recording.dtype),
        "order": list(recording.order),
        "layouts": {name: recording.layouts[name].to_json() for name in recording.order},
        "layers": {name: recording.layers[name] for name in recording.order},
        "tensors": {key: {"dtype": _dtype_name(t.dtype), "shape": list(t.shape)} for key, t in tensors.items()},
        "calls": calls_manifest,
        "partial": recording.interrupted_by if recording.partial else None,
    }
    os.replace(temporary_tensors, tensors_path)
    temporary_manifest = directory / (MANIFEST_FILE + ".tmp")
    temporary_manifest.write_text(json.dumps(manifest, indent=1))
    os.replace(temporary_manifest, manifest_path)


def load_recording(path: str | os.PathLike, device: str | torch.device = "cpu") -> LoadedRecording:
    """Read a recording written by `save_recording`: the directory `path` holding two files.

    - `manifest.json`: `format` ("interp_cache.recording"), `version` (2), `tensors_file`,
      `tensors_bytes` and `tensors_sha256` (size and SHA-256 of the tensors file), `record_device`,
      `record_dtype`, `order` (hook names in model order), `layouts` (hook name -> its `HookLayout`),
      `layers` (hook name -> layer index or null), `tensors` (key -> dtype and shape) and
      `calls` (hook name -> list of {step, positions, is_padding, key_positions (or null),
      activation}, each a tensor key), and `partial` (null, or why the recording stopped early).
    - `tensors.safetensors`: every tensor under its key, bit for bit as recorded.

    The whole tensors file is checked against size and checksum, and every tensor against the
    manifest, before anything is returned; any mismatch raises `RecordingFileError` naming the file.
    """
    directory = Path(path)
    manifest_path = directory / MANIFEST_FILE
    if not directory.is_dir():
        raise RecordingFileError(f"{directory}: no recording here (expected a directory holding "
                                 f"{MANIFEST_FILE} and {TENSORS_FILE}, as save_recording writes)")
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
    layouts = {name: _layout_from_manifest(manifest_path, name, manifest["layouts"].get(name))
               for name in manifest["order"]}
    layers = {name: manifest["layers"].get(name) for name in manifest["order"]}
    calls = {
        name: [_call_from_manifest(manifest_path, name, index, entry, tensors)
               for index, entry in enumerate(manifest["calls"][name])]
        for name in manifest["order"]
    }
    return LoadedRecording(list(manifest["order"]), calls, layouts, layers, record_dtype, manifest.get("partial"))


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
    "tensors_file": str, "tensors_bytes": int, "tensors_sha256": str, "order": list, "layouts": dict, "layers": dict,
    "tensors": dict, "calls": dict,
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


def _layout_from_manifest(manifest_path: Path, name: str, entry) -> HookLayout:
    try:
        return HookLayout.from_json(entry)
    except (ValueError, TypeError) as error:
        raise RecordingFileError(f"{manifest_path}: the layout of {name!r} is not readable ({error})") from None


def _call_from_manifest(manifest_path: Path, name: str, index: int, entry, tensors: dict) -> dict:
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

    call = {"step": entry["step"], "positions": tensor("positions"), "is_padding": tensor("is_padding"),
            "key_positions": tensor("key_positions", optional=True), "activation": tensor("activation")}
    if call["positions"].shape != call["is_padding"].shape or call["positions"].ndim != 2:
        raise RecordingFileError(
            f"{where}: positions {list(call['positions'].shape)} and is_padding {list(call['is_padding'].shape)} must "
            f"be equal [b, p] shapes"
        )
    return call


