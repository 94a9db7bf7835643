"""`load(name)`: a HookedModel from the zoo (`zoo:<family>`, `zoo:<trained model>`), a local checkpoint or a
hub name.

Random-weight zoo models are built from configs; the trained ones (`zoo:needle`, `zoo:needle-alibi`) are
checkpoints shipped in the package. Both use the offline byte tokenizer. Checkpoints go through
transformers' `from_pretrained` and the same wrapping code, so a real model is treated exactly like a zoo
model.
"""

from __future__ import annotations

import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

from interp_cache.adapters.registry import family_of
from interp_cache.models.hooked_model import HookedModel
from interp_cache.models.tokenizer import ByteTokenizer
from interp_cache.models.trained import trained_models
from interp_cache.models.zoo import ZOO, build_zoo_model

ZOO_PREFIX = "zoo:"
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def resolve_dtype(dtype) -> torch.dtype | None:
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    if dtype in _DTYPES:
        return _DTYPES[dtype]
    raise ValueError(f"dtype {dtype!r} is not accepted; use one of {', '.join(_DTYPES)} or a torch.dtype")


def zoo_names() -> list[str]:
    """Every `zoo:` name: the random-weight model of each family, then the trained models."""
    return list(ZOO) + list(trained_models())


def load(name: str, dtype=None, device=None, tokenizer=None, **zoo_overrides) -> HookedModel:
    """`tokenizer`: use this one instead of the zoo's byte tokenizer or the checkpoint's own."""
    dtype = resolve_dtype(dtype)
    trained = trained_models()
    if name.startswith(ZOO_PREFIX):
        zoo_name = name[len(ZOO_PREFIX) :]
        if zoo_name in trained:
            if zoo_overrides:
                raise ValueError(f"zoo:{zoo_name} is a trained checkpoint: config overrides "
                                 f"({', '.join(zoo_overrides)}) apply to the random-weight zoo models only")
            hf_model = AutoModelForCausalLM.from_pretrained(trained[zoo_name], dtype=dtype or torch.float32).eval()
        elif zoo_name in ZOO:
            hf_model = build_zoo_model(zoo_name, dtype=dtype or torch.float32, **zoo_overrides)
        else:
            raise ValueError(f"no zoo model {zoo_name!r}; the zoo has: {', '.join(zoo_names())}")
        tokenizer = tokenizer or ByteTokenizer()
    else:
        family_of(AutoConfig.from_pretrained(name))  # unsupported architectures fail before weights load
        hf_model = AutoModelForCausalLM.from_pretrained(name, dtype=dtype or "auto").eval()
        if tokenizer is None:
            tokenizer = AutoTokenizer.from_pretrained(name, padding_side="left")
            if tokenizer.pad_token is None:
                tokenizer.pad_token = tokenizer.eos_token
    if device is not None:
        hf_model = hf_model.to(device)
    return HookedModel(hf_model, tokenizer=tokenizer)
