"""`load(name)`: a HookedModel from the zoo (`zoo:<family>`, `zoo:<trained model>`), a local checkpoint or a
hub name.

Random-weight zoo models are built from configs; the trained ones (`zoo:needle`) are
checkpoints shipped in the package. Both use the offline byte tokenizer. Checkpoints go through
transformers' `from_pretrained` and the same wrapping code, so a real model is treated exactly like a zoo
model.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, PreTrainedModel

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


TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json", "spiece.model")


def load(name, dtype=None, device=None, tokenizer=None, **options) -> HookedModel:
    """A HookedModel from `zoo:<name>`, a local checkpoint folder, a hub name, or a transformers model
    already built (wrapped in place, with `tokenizer`).

    `tokenizer`: use this one instead of the zoo's byte tokenizer or the checkpoint's own. `options`: for
    random-weight zoo models, config fields (`sliding_window=4`); for checkpoints, `from_pretrained`
    arguments (`device_map`, `attn_implementation`, `revision`, `trust_remote_code`, ...).
    """
    dtype = resolve_dtype(dtype)
    if isinstance(name, PreTrainedModel):
        if options or dtype is not None:
            raise ValueError("a model already built is wrapped as it is: convert it (.to(dtype)) before load(); "
                             f"options {sorted(options)} apply to names only")
        return HookedModel(name if device is None else name.to(device), tokenizer=tokenizer)
    if not isinstance(name, (str, os.PathLike)):
        raise TypeError(f"load takes 'zoo:<name>', a checkpoint folder, a hub name or a transformers "
                        f"PreTrainedModel; got {type(name).__name__}")
    name = os.fspath(name)
    if name.startswith(ZOO_PREFIX):
        hf_model = _zoo_model(name[len(ZOO_PREFIX) :], dtype, options)
        tokenizer = tokenizer or ByteTokenizer()
    else:
        local = Path(name).is_dir()
        if not local and name in zoo_names():
            raise ValueError(f"{name!r} is not a checkpoint folder; did you mean 'zoo:{name}' (the built-in model)? "
                             "Hub models load by their full id (e.g. 'openai-community/gpt2') where the network allows")
        if tokenizer is None and local:
            tokenizer = _local_tokenizer(Path(name))  # before the weights load: a missing tokenizer fails fast
        family_of(AutoConfig.from_pretrained(name, **_config_options(options)))  # unsupported: fail before weights
        hf_model = AutoModelForCausalLM.from_pretrained(name, dtype=dtype or "auto", **options).eval()
        if tokenizer is None:
            tokenizer = AutoTokenizer.from_pretrained(name, padding_side="left")
            if tokenizer.pad_token is None:
                tokenizer.pad_token = tokenizer.eos_token
    if device is not None:
        hf_model = hf_model.to(device)
    return HookedModel(hf_model, tokenizer=tokenizer)


def _zoo_model(zoo_name: str, dtype, options: dict):
    trained = trained_models()
    if zoo_name in trained:
        if options:
            raise ValueError(f"zoo:{zoo_name} is a trained checkpoint: config overrides "
                             f"({', '.join(options)}) apply to the random-weight zoo models only")
        return AutoModelForCausalLM.from_pretrained(trained[zoo_name], dtype=dtype or torch.float32).eval()
    if zoo_name in ZOO:
        return build_zoo_model(zoo_name, dtype=dtype or torch.float32, **options)
    raise ValueError(f"no zoo model {zoo_name!r}; the zoo has: {', '.join(zoo_names())}")


def _config_options(options: dict) -> dict:
    return {key: options[key] for key in ("revision", "trust_remote_code", "token", "cache_dir") if key in options}


def _local_tokenizer(folder: Path):
    """The folder's tokenizer where this project's byte tokenizer saved it; None for transformers to load;
    an error naming `tokenizer=` where the folder has no tokenizer files at all."""
    config = folder / "tokenizer_config.json"
    if config.is_file() and json.loads(config.read_text()).get("tokenizer_class") == ByteTokenizer.__name__:
        return ByteTokenizer(padding_side="left")
    if not any((folder / file).is_file() for file in TOKENIZER_FILES):
        raise ValueError(
            f"{folder} has no tokenizer files ({', '.join(TOKENIZER_FILES)}): pass tokenizer= to load() "
            "(e.g. interp_cache.ByteTokenizer() for a model trained on bytes, or AutoTokenizer.from_pretrained(...))"
        )
    return None
