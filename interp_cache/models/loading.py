"""`load(name)`: a HookedModel from the zoo (`zoo:<family>`), a local checkpoint or a hub name.

Zoo models are built from configs with the offline byte tokenizer; checkpoints go through transformers'
`from_pretrained` and the same wrapping code, so a real model is treated exactly like a zoo model.
"""

from __future__ import annotations

import torch

from interp_cache.adapters.registry import family_of
from interp_cache.models.hooked_model import HookedModel
from interp_cache.models.tokenizer import ByteTokenizer
from interp_cache.models.zoo import ZOO, build_zoo_model

ZOO_PREFIX = "zoo:"
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def resolve_dtype(dtype) -> torch.dtype | None:
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    if dtype in _DTYPES:
        return _DTYPES[dtype]
    raise ValueError(f"dtype {dtype!r} is not accepted; use one of {', '.join(_DTYPES)} or a torch.dtype")


def load(name: str, dtype=None, device=None, tokenizer=None, **zoo_overrides) -> HookedModel:
    """`tokenizer`: use this one instead of the zoo's byte tokenizer or the checkpoint's own."""
    dtype = resolve_dtype(dtype)
    if name.startswith(ZOO_PREFIX):
        family = name[len(ZOO_PREFIX) :]
        if family not in ZOO:
            raise ValueError(f"no zoo model {family!r}; the zoo has: {', '.join(ZOO)}")
        hf_model = build_zoo_model(family, dtype=dtype or torch.float32, **zoo_overrides)
        tokenizer = tokenizer or ByteTokenizer()
    else:
        from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

        family_of(AutoConfig.from_pretrained(name))  # unsupported architectures fail before weights load
        hf_model = AutoModelForCausalLM.from_pretrained(name, dtype=dtype or "auto").eval()
        if tokenizer is None:
            tokenizer = AutoTokenizer.from_pretrained(name, padding_side="left")
            if tokenizer.pad_token is None:
                tokenizer.pad_token = tokenizer.eos_token
    if device is not None:
        hf_model = hf_model.to(device)
    return HookedModel(hf_model, tokenizer=tokenizer)
