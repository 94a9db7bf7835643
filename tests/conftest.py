"""Shared fixtures: zoo models (built once per process) and a left-padded prompt batch."""

from __future__ import annotations

import dataclasses
import functools
import pytest
import torch

import interp_cache as ic
from interp_cache import verify
from interp_cache.compress import H2O, AdaKV, HeadWise, SnapKV, StreamingLLM
from interp_cache.models.zoo import ZOO, build_zoo_model

# pytest -n 2 runs two workers on a 2-core machine: one torch thread each, or their thread pools fight
# over the cores and small ops wait milliseconds for each other.
torch.set_num_threads(1)

FAMILIES = list(ZOO)
PROMPTS = ["The quick brown fox jumps over the lazy dog", "Hello there"]


@functools.lru_cache(maxsize=None)
def hooked(family: str) -> ic.HookedModel:
    return ic.load(f"zoo:{family}")


@functools.lru_cache(maxsize=None)
def original(family: str, attn_implementation: str | None = None):
    """The unwrapped transformers model with the same weights as `hooked(family)`."""
    return build_zoo_model(family, attn_implementation=attn_implementation)


def padded_batch(model: ic.HookedModel, prompts=PROMPTS):
    enc = model.tokenizer(list(prompts), padding=True, return_tensors="pt")
    return enc["input_ids"], enc["attention_mask"]


def original_logits(hf_model, input_ids, attention_mask):
    """The original model called as `generate` calls it: padding-aware position ids where it takes them."""
    with torch.no_grad():
        return verify.original_logits(hf_model, input_ids, attention_mask)


@pytest.fixture(params=FAMILIES)
def family(request) -> str:
    return request.param


def hide_entries_not_read(read_positions_by_layer):
    """Hooks for a dense run: per head, hide (position -1) every entry the compressed run did not read."""

    def hook_for(read_bgk):
        def hook(positions_bgk, hook):
            read = read_bgk.to(positions_bgk.device)
            in_read = (positions_bgk[..., :, None] == read[..., None, :]).any(-1) & (positions_bgk >= 0)
            return positions_bgk.masked_fill(~in_read, -1)

        return hook

    return [(f"blocks.{i}.cache.hook_positions", hook_for(read)) for i, read in read_positions_by_layer.items()]


def policy_with_budget(cls, budget: int):
    """A registered policy class built from a budget alone (entries per head), everything else its default."""
    names = {f.name for f in dataclasses.fields(cls)}
    if "budget" in names:
        return cls(budget=budget)
    if cls is StreamingLLM:
        return StreamingLLM(window=max(1, budget - 4))
    if cls is H2O:
        return H2O(heavy=budget // 2, recent=budget - budget // 2)
    if cls is AdaKV:
        return AdaKV(SnapKV(budget=budget))
    if cls is HeadWise:
        return HeadWise({(0, 0): None}, default=SnapKV(budget=budget))
    raise AssertionError(f"no budget-only construction for {cls.__name__}: add it here")
