"""Shared fixtures: zoo models (built once per process) and a left-padded prompt batch."""

from __future__ import annotations

import functools
import pytest
import torch

import interp_cache as ic
from interp_cache import verify
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
