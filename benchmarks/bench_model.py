"""The benchmark's model and prompts: one llama-style shape, the same weights for every tool compared.

4 layers, hidden 256, 8 query heads sharing 2 KV heads (GQA), the byte vocabulary; random weights from seed 0
(speed and memory do not depend on what the weights mean). Every peer loads these weights: transformers and
TransformerLens from the built model, kvpress from `save_pretrained` in its own environment.
"""

from __future__ import annotations

import torch

from interp_cache.models.hooked_model import HookedModel
from interp_cache.models.tokenizer import ByteTokenizer
from interp_cache.models.zoo import build_zoo_model

SHAPE = dict(hidden=256, layers=4, heads=8, num_key_value_heads=2)
SHAPE_TEXT = "4 layers, hidden 256, 8 query / 2 KV heads, head_dim 32, float32, byte vocabulary"


def plain_model():
    """The transformers model itself (SDPA attention), unwrapped."""
    return build_zoo_model("llama", **SHAPE)


def hooked_model() -> HookedModel:
    return HookedModel(build_zoo_model("llama", **SHAPE), ByteTokenizer())


def prompt(batch: int, tokens: int, seed: int = 0) -> torch.Tensor:
    """Random byte ids (3..250: no special tokens), the same for every tool."""
    return torch.randint(3, 251, (batch, tokens), generator=torch.Generator().manual_seed(seed))
