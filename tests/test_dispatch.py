"""Models split across devices as users load them: accelerate's `device_map` (a dict, or "auto" with
`max_memory`), CPU + disk offload here, `cuda:0` / `cuda:1` where two GPUs exist.

The dispatched model must compute what the undispatched one does with the same weights: logits, greedy
tokens, every hook's activation, the cache (each layer's entries on its layer's execution device),
compression and the verifier. accelerate allows one CPU device ("cpu"), so the CPU maps mix "cpu" and
"disk"; the family list covers a rotary adapter (llama), learned positions (gpt2), ALiBi (bloom) and
the generic path (phi3).
"""

from __future__ import annotations

import functools

import pytest
import torch

import interp_cache as ic
from conftest import padded_batch
from interp_cache.compress import SnapKV
from interp_cache.core.context import ForwardContext
from interp_cache.models.zoo import build_zoo_model
from interp_cache.verify import verify

DISPATCHED = ["llama", "gpt2", "bloom", "phi3"]


@functools.lru_cache(maxsize=None)
def _saved(family: str, folder: str) -> str:
    build_zoo_model(family).save_pretrained(folder)
    return folder


def _layer_names(model: ic.HookedModel) -> list[str]:
    names = {module: name for name, module in model.hf_model.named_modules()}
    return [names[layer] for layer in model.adapter.decoder_layers(model.hf_model)]


def _load(family: str, tmp_path_factory, device_map, **options) -> ic.HookedModel:
    folder = _saved(family, str(tmp_path_factory.mktemp(f"{family}-weights")))
    offload = tmp_path_factory.mktemp(f"{family}-offload")
    return ic.load(folder, tokenizer=ic.ByteTokenizer(), device_map=device_map, offload_folder=str(offload), **options)


def _map_with_last_layer_on(family: str, device: str, others: str = "cpu") -> dict:
    """Every module on `others`, the last decoder layer on `device`."""
    undispatched = ic.load(f"zoo:{family}")
    layers = _layer_names(undispatched)
    mapping = {name: others for name in _leaf_groups(undispatched.hf_model, layers)}
    mapping[layers[-1]] = device
    return mapping


def _leaf_groups(hf_model, layers: list[str]) -> list[str]:
    """The decoder layers and every module outside them that holds parameters or buffers directly."""
    groups = list(layers)
    for name, module in hf_model.named_modules():
        inside = any(name == layer or name.startswith(layer + ".") for layer in layers)
        owns = any(True for _ in module.parameters(recurse=False)) or any(True for _ in module.buffers(recurse=False))
        if name and not inside and owns:
            groups.append(name)
    return groups


def _same_run(model: ic.HookedModel, reference: ic.HookedModel):
    input_ids, attention_mask = padded_batch(reference)
    with torch.no_grad():
        logits = model(input_ids, attention_mask=attention_mask).logits
        expected = reference(input_ids, attention_mask=attention_mask).logits
    assert (logits.cpu() - expected.cpu()).abs().max().item() == 0.0
    greedy = dict(max_new_tokens=6, do_sample=False, eos_token_id=None)
    assert torch.equal(model.generate(input_ids, attention_mask=attention_mask, **greedy).cpu(),
                       reference.generate(input_ids, attention_mask=attention_mask, **greedy).cpu())
    with model.record() as recording, torch.no_grad():
        model.generate(input_ids, attention_mask=attention_mask, **greedy)
    with reference.record() as expected_recording, torch.no_grad():
        reference.generate(input_ids, attention_mask=attention_mask, **greedy)
    assert recording.names() == expected_recording.names() and len(recording.names()) > 20
    for name in expected_recording.names():
        for got, want in zip(recording[name], expected_recording[name], strict=True):
            assert torch.equal(got.activation, want.activation) and torch.equal(got.positions, want.positions), name
    compressed = model.generate(input_ids, attention_mask=attention_mask, compress=SnapKV(budget=8, window=2), **greedy)
    expected_compressed = reference.generate(input_ids, attention_mask=attention_mask, compress=SnapKV(budget=8, window=2),
                                             **greedy)
    assert torch.equal(compressed.cpu(), expected_compressed.cpu())


@pytest.mark.parametrize("family", DISPATCHED)
def test_a_dict_device_map_with_disk_offload_computes_what_the_undispatched_model_does(family, tmp_path_factory):
    reference = ic.load(f"zoo:{family}")
    model = _load(family, tmp_path_factory, _map_with_last_layer_on(family, "disk"))
    assert "disk" in set(model.hf_model.hf_device_map.values())
    _same_run(model, reference)
    cache = model.new_cache()
    input_ids, attention_mask = padded_batch(reference)
    with torch.no_grad():
        model(input_ids, attention_mask=attention_mask, past_key_values=cache, use_cache=True)
    assert all(layer.keys.device.type == "cpu" for layer in cache.layers)


def test_auto_device_map_with_max_memory_offloads_and_verifies_llama(tmp_path_factory):
    model = _load("llama", tmp_path_factory, "auto", max_memory={"cpu": 250_000})
    assert {"cpu", "disk"} <= set(model.hf_model.hf_device_map.values())
    report = verify(model, max_new_tokens=4)
    assert all(row.status == "pass" for row in report.rows), [(r.check, r.status, r.note) for r in report.rows]


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA devices")
@pytest.mark.parametrize("family", DISPATCHED)
def test_layers_on_two_gpus_compute_what_one_device_does(family, tmp_path_factory):
    reference = ic.load(f"zoo:{family}", device="cuda:0")
    model = _load(family, tmp_path_factory, _map_with_last_layer_on(family, "cuda:1", others="cuda:0"))
    _same_run(model, reference)


def test_a_forward_context_moves_its_positions_to_a_layers_device_once():
    """What lets a layer on another device read positions where its cache entries live (the two-GPU test
    exercises it for real; "meta" stands in for the second device here)."""
    positions = torch.tensor([[0, 1, 2], [0, 0, 1]])
    context = ForwardContext(3, positions, positions == 0, True)
    assert context.on(torch.device("cpu")) is context
    moved = context.on(torch.device("meta"))
    assert moved.positions.device.type == "meta" and moved.is_padding.device.type == "meta"
    assert context.on(torch.device("meta")) is moved
    assert (moved.step, moved.has_padding, moved.num_new) == (3, True, 3)
