"""The built-in zoo: a tiny, randomly initialised model of every supported family, built offline.

Each family's adapter file declares its zoo config (`interp_cache.adapters`); this module sizes them
(2 layers, hidden 64, the byte tokenizer's ids) and builds the models. Each config is chosen so the
family's distinguishing feature is exercised: GQA, a sliding window shorter than the test prompts,
partial rotary, softcapping, ALiBi. Weights come from a fixed seed with a larger-than-usual init scale, so greedy decoding has clear
margins between the top tokens and cached-vs-uncached comparisons are not decided by float noise.
"""

from __future__ import annotations

import torch
import transformers as tf

from interp_cache.adapters.base import Family, ZooShape
from interp_cache.adapters.registry import families
from interp_cache.models.tokenizer import BOS_ID, EOS_ID, PAD_ID, VOCAB_SIZE

HIDDEN = 64
LAYERS = 2
HEADS = 4
MAX_POSITIONS = 1024
INIT_RANGE = 0.2

ZOO: dict[str, Family] = families()  # name -> family; `ZOO[name].description` says what its model exercises


def zoo_config(family: str, hidden: int = HIDDEN, layers: int = LAYERS, heads: int = HEADS, **overrides):
    """The family's zoo config at this size; `overrides` are config fields (e.g. `sliding_window=4`)."""
    if family not in ZOO:
        raise ValueError(f"no zoo model {family!r}; the zoo has: {', '.join(ZOO)}")
    shape = ZooShape(hidden, layers, heads, MAX_POSITIONS, INIT_RANGE, VOCAB_SIZE, PAD_ID, BOS_ID, EOS_ID)
    return ZOO[family].zoo_config(shape, **overrides)


def build_zoo_model(
    family: str, seed: int = 0, dtype: torch.dtype = torch.float32, attn_implementation: str | None = None, **overrides
):
    """A transformers model (unwrapped) of the family, random weights from `seed`, eval mode.

    `attn_implementation` is passed to transformers (None: its default, SDPA where the family has it).
    """
    config = zoo_config(family, **overrides)
    generator_state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    try:
        extra = {"attn_implementation": attn_implementation} if attn_implementation else {}
        model = tf.AutoModelForCausalLM.from_config(config, dtype=dtype, **extra)
    finally:
        torch.random.set_rng_state(generator_state)
    return model.eval()
