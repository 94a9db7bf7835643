"""The built-in zoo: a tiny, randomly initialised model of every supported family, built offline.

Each entry is a transformers config (2 layers, hidden 64) chosen so the family's distinguishing
feature is exercised: GQA, a sliding window shorter than the test prompts, partial rotary, softcapping,
ALiBi. Weights come from a fixed seed with a larger-than-usual init scale, so greedy decoding has clear
margins between the top tokens and cached-vs-uncached comparisons are not decided by float noise.
"""

from __future__ import annotations

from typing import Any, Callable

import torch
import transformers as tf

from interp_cache.models.tokenizer import BOS_ID, EOS_ID, PAD_ID, VOCAB_SIZE

HIDDEN = 64
LAYERS = 2
HEADS = 4
MAX_POSITIONS = 1024
INIT_RANGE = 0.2

_COMMON_IDS = dict(vocab_size=VOCAB_SIZE, pad_token_id=PAD_ID, bos_token_id=BOS_ID, eos_token_id=EOS_ID)


def _llama_like(config_class, **extra) -> Callable[..., Any]:
    def make(hidden=HIDDEN, layers=LAYERS, heads=HEADS, **overrides):
        fields = dict(
            hidden_size=hidden,
            intermediate_size=2 * hidden,
            num_hidden_layers=layers,
            num_attention_heads=heads,
            num_key_value_heads=heads // 2,
            max_position_embeddings=MAX_POSITIONS,
            initializer_range=INIT_RANGE,
            tie_word_embeddings=False,
        )
        return _config(config_class, {**fields, **extra}, overrides)

    return make


def _config(config_class, fields: dict, overrides: dict):
    return config_class(**{**_COMMON_IDS, **fields, **overrides})


def _gpt2(hidden=HIDDEN, layers=LAYERS, heads=HEADS, **overrides):
    fields = dict(n_embd=hidden, n_layer=layers, n_head=heads, n_positions=MAX_POSITIONS, initializer_range=INIT_RANGE)
    return _config(tf.GPT2Config, fields, overrides)


def _opt(hidden=HIDDEN, layers=LAYERS, heads=HEADS, **overrides):
    fields = dict(
        hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads, ffn_dim=2 * hidden,
        word_embed_proj_dim=hidden, max_position_embeddings=MAX_POSITIONS, init_std=INIT_RANGE,
    )
    return _config(tf.OPTConfig, fields, overrides)


def _gpt_neox(hidden=HIDDEN, layers=LAYERS, heads=HEADS, **overrides):
    fields = dict(
        hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads, intermediate_size=2 * hidden,
        max_position_embeddings=MAX_POSITIONS, initializer_range=INIT_RANGE, tie_word_embeddings=False,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": 0.25},
    )
    return _config(tf.GPTNeoXConfig, fields, overrides)


def _gptj(hidden=HIDDEN, layers=LAYERS, heads=HEADS, **overrides):
    fields = dict(
        n_embd=hidden, n_layer=layers, n_head=heads, rotary_dim=8, n_positions=MAX_POSITIONS,
        initializer_range=INIT_RANGE, tie_word_embeddings=False,
    )
    return _config(tf.GPTJConfig, fields, overrides)


def _phi(hidden=HIDDEN, layers=LAYERS, heads=HEADS, **overrides):
    fields = dict(
        hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads, intermediate_size=2 * hidden,
        max_position_embeddings=MAX_POSITIONS, initializer_range=INIT_RANGE, tie_word_embeddings=False,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": 0.5},
    )
    return _config(tf.PhiConfig, fields, overrides)


def _bloom(hidden=HIDDEN, layers=LAYERS, heads=HEADS, **overrides):
    fields = dict(hidden_size=hidden, n_layer=layers, n_head=heads, initializer_range=INIT_RANGE)
    return _config(tf.BloomConfig, fields, overrides)


def _falcon(alibi: bool):
    def make(hidden=HIDDEN, layers=LAYERS, heads=HEADS, **overrides):
        fields = dict(
            hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
            max_position_embeddings=MAX_POSITIONS, initializer_range=INIT_RANGE, alibi=alibi,
            new_decoder_architecture=False,
            # Falcon-7B style (rotary): multi-query, parallel attention; Falcon-RW style (ALiBi): neither.
            multi_query=not alibi, parallel_attn=not alibi, bias=alibi,
        )
        return _config(tf.FalconConfig, fields, overrides)

    return make


def _mpt(hidden=HIDDEN, layers=LAYERS, heads=HEADS, **overrides):
    fields = dict(
        d_model=hidden, n_heads=heads, n_layers=layers, expansion_ratio=2, max_seq_len=MAX_POSITIONS,
        initializer_range=INIT_RANGE, attn_config={"alibi": True, "alibi_bias_max": 8},
    )
    return _config(tf.MptConfig, fields, overrides)


ZOO: dict[str, Callable[..., Any]] = {
    "gpt2": _gpt2,
    "opt": _opt,
    "gpt_neox": _gpt_neox,
    "gptj": _gptj,
    "llama": _llama_like(tf.LlamaConfig),
    "mistral": _llama_like(tf.MistralConfig, sliding_window=12),
    "qwen2": _llama_like(tf.Qwen2Config),
    "qwen3": _llama_like(tf.Qwen3Config, head_dim=HIDDEN // HEADS),
    "gemma2": _llama_like(
        tf.Gemma2Config,
        head_dim=HIDDEN // HEADS,
        sliding_window=12,
        layer_types=["sliding_attention", "full_attention"],
        attn_logit_softcapping=50.0,
        final_logit_softcapping=30.0,
        query_pre_attn_scalar=HIDDEN // HEADS,
    ),
    "phi": _phi,
    "bloom": _bloom,
    "falcon": _falcon(alibi=False),
    "falcon_alibi": _falcon(alibi=True),
    "mpt": _mpt,
}

DESCRIPTIONS = {
    "gpt2": "learned absolute positions",
    "opt": "learned positions with offset 2",
    "gpt_neox": "partial rotary (25%), parallel residual",
    "gptj": "interleaved rotary on 8 of 16 channels",
    "llama": "rotary, GQA 4 query / 2 KV heads",
    "mistral": "rotary, GQA, sliding window 12",
    "qwen2": "rotary, GQA, q/k/v bias",
    "qwen3": "rotary, GQA, per-head q/k RMSNorm",
    "gemma2": "softcapping, sliding window 12 on even layers",
    "phi": "partial rotary (50%), dense output",
    "bloom": "ALiBi, fused qkv",
    "falcon": "rotary, multi-query, parallel attention",
    "falcon_alibi": "ALiBi (Falcon-RW style), bfloat16 bias table",
    "mpt": "ALiBi (alibi_bias_max 8)",
}


def zoo_config(family: str, **overrides):
    if family not in ZOO:
        raise ValueError(f"no zoo model {family!r}; the zoo has: {', '.join(ZOO)}")
    return ZOO[family](**overrides)


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
