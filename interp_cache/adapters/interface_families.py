"""Families served by the generic path (`attention_interface.py`) with their block layout and zoo model.

Phi-3 (fused q|k|v projection, longrope scaling), Gemma-3 text (local/global layers with different
rotary bases, q/k RMSNorm, sliding window) and OLMo-2 (q/k RMSNorm over all heads, norms after attention
and MLP). Nothing here computes attention: each module runs its own forward up to transformers'
attention interface. What each file line declares is what the model cannot tell the probe: where the
MLP's contribution and the mid-block residual are, and where a fused projection splits.
"""

from __future__ import annotations

import transformers as tf

from interp_cache.adapters.attention_interface import AttentionInterfaceAdapter
from interp_cache.adapters.base import BlockLayout, Family, ZooShape

_ZOO_HEAD_DIM = 16


def _phi3_config(shape: ZooShape, **overrides):
    # longrope: per-frequency factors, short ones below original_max_position_embeddings. The zoo keeps every
    # prompt below it (its long factors apply once a sequence passes it, in transformers as here).
    half = _ZOO_HEAD_DIM // 2
    rope = {"rope_type": "longrope", "rope_theta": 10000.0, "short_factor": [1.0 + 0.25 * i for i in range(half)],
            "long_factor": [2.0 + 0.5 * i for i in range(half)], "original_max_position_embeddings": shape.max_positions}
    return shape.build(tf.Phi3Config, overrides, **shape.standard_fields(), num_key_value_heads=shape.heads // 2,
                       rope_parameters=rope, original_max_position_embeddings=shape.max_positions)


def _gemma3_config(shape: ZooShape, **overrides):
    rope = {"sliding_attention": {"rope_type": "default", "rope_theta": 10000.0},
            "full_attention": {"rope_type": "linear", "factor": 8.0, "rope_theta": 1000000.0}}
    return shape.build(tf.Gemma3TextConfig, overrides, **shape.standard_fields(), num_key_value_heads=shape.heads // 2,
                       head_dim=_ZOO_HEAD_DIM, query_pre_attn_scalar=_ZOO_HEAD_DIM, sliding_window=12,
                       layer_types=["sliding_attention", "full_attention"] * (shape.layers // 2) + ["full_attention"] * (shape.layers % 2),
                       rope_parameters=rope, final_logit_softcapping=30.0)


def _olmo2_config(shape: ZooShape, **overrides):
    return shape.build(tf.Olmo2Config, overrides, **shape.standard_fields(), num_key_value_heads=shape.heads // 2)


_LLAMA_BLOCK = BlockLayout(mlp_out="mlp", resid_mid="post_attention_layernorm", final_norm="model.norm")
# Gemma-3 and OLMo-2 normalise each branch's output before adding it: the MLP's contribution is that norm's output.
_GEMMA3_BLOCK = BlockLayout("post_feedforward_layernorm", "pre_feedforward_layernorm", "model.norm")
_OLMO2_BLOCK = BlockLayout("post_feedforward_layernorm", "mlp", "model.norm")

FAMILIES = [
    Family("phi3", AttentionInterfaceAdapter("phi3", _LLAMA_BLOCK, fused_qkv="qkv_proj"), "phi3", _phi3_config,
           "generic path: fused qkv, longrope scaling, GQA"),
    Family("gemma3_text", AttentionInterfaceAdapter("gemma3_text", _GEMMA3_BLOCK), "gemma3_text", _gemma3_config,
           "generic path: local (window 12, base 1e4) / global (linear-scaled, base 1e6) layers, q/k RMSNorm"),
    Family("olmo2", AttentionInterfaceAdapter("olmo2", _OLMO2_BLOCK), "olmo2", _olmo2_config,
           "generic path: q/k RMSNorm over all heads, post-attention and post-MLP norms"),
]
