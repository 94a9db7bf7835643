"""Families whose attention follows transformers' attention interface with half-split rotary.

Llama (GQA), Mistral (sliding window), Qwen2 (q/k/v bias), Qwen3 (per-head q/k RMSNorm before rotary),
Gemma-2 (query_pre_attn_scalar scaling, attention-logit softcapping, alternating sliding window) and
Phi (partial rotary, dense output, optional q/k LayerNorm). Their modules differ only in a few
attributes, read off each module instance; `position_embeddings=(cos, sin)` comes from the model's
own rotary module, computed from the true position ids.
"""

from __future__ import annotations

from typing import Any

import torch
import transformers as tf
from torch import nn

from interp_cache.adapters.base import PARALLEL_BLOCK, BlockLayout, Family, FamilyAdapter, LayerRunner, ZooShape
from interp_cache.core.attention import AttentionSpec
from interp_cache.core.rotary import apply_half_split_rotary


class RotaryInterfaceAdapter(FamilyAdapter):
    rotary = True

    def decoder_layers(self, hf_model):
        return list(hf_model.model.layers)

    def attention_module(self, layer):
        return layer.self_attn

    def token_embedding(self, hf_model):
        return hf_model.model.embed_tokens

    def attention_spec(self, hf_model, layer_idx, module) -> AttentionSpec:
        config = hf_model.config
        sliding_window = getattr(module, "sliding_window", None)
        if sliding_window is None and self.family == "mistral":
            sliding_window = getattr(config, "sliding_window", None)
        return AttentionSpec(
            num_heads=config.num_attention_heads,
            num_kv_heads=getattr(config, "num_key_value_heads", None) or config.num_attention_heads,
            head_dim=module.head_dim,
            scaling=module.scaling,
            softcap=getattr(module, "attn_logit_softcapping", None),
            sliding_window=sliding_window,
        )

    def project_qkv(self, module, hidden_states, call_kwargs):
        b, p, _ = hidden_states.shape
        shape = (b, p, -1, module.head_dim)
        q = module.q_proj(hidden_states).view(shape)
        k = module.k_proj(hidden_states).view(shape)
        v = module.v_proj(hidden_states).view(shape)
        if hasattr(module, "q_norm"):  # Qwen3: RMSNorm over each head's channels
            q, k = module.q_norm(q), module.k_norm(k)
        if getattr(module, "qk_layernorm", False):  # Phi
            q, k = module.q_layernorm(q), module.k_layernorm(k)
        return q, k, v

    def apply_rotary(self, module, q_bphd, k_bpgd, call_kwargs):
        cos, sin = call_kwargs["position_embeddings"]
        return apply_half_split_rotary(q_bphd, cos, sin), apply_half_split_rotary(k_bpgd, cos, sin)

    def project_out(self, module, z_bphd):
        b, p = z_bphd.shape[:2]
        out_proj = module.dense if hasattr(module, "dense") else module.o_proj
        return out_proj(z_bphd.reshape(b, p, -1))

    def block_layout(self, config) -> BlockLayout:
        if self.family == "phi":
            return BlockLayout("mlp", None, "model.final_layernorm", PARALLEL_BLOCK)
        if self.family == "gemma2":  # post-attention and post-MLP norms sit inside the residual branches
            return BlockLayout("post_feedforward_layernorm", "pre_feedforward_layernorm", "model.norm")
        return BlockLayout("mlp", "post_attention_layernorm", "model.norm")

    def make_forward(self, module: nn.Module, runner: LayerRunner):
        def forward(hidden_states: torch.Tensor, position_embeddings=None, *args: Any, **kwargs: Any):
            return runner(hidden_states, {"position_embeddings": position_embeddings}), None

        return forward


def _llama_like(config_class, **extra):
    def make(shape: ZooShape, **overrides):
        return shape.build(
            config_class, overrides, **shape.standard_fields(), num_key_value_heads=shape.heads // 2, **extra
        )

    return make


def _phi_config(shape: ZooShape, **overrides):
    return shape.build(
        tf.PhiConfig, overrides, **shape.standard_fields(),
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": 0.5},
    )


def _family(name: str, zoo_config, description: str) -> Family:
    adapter = RotaryInterfaceAdapter()
    adapter.family = name
    return Family(name, adapter, name, zoo_config, description)


_ZOO_HEAD_DIM = 16  # families that take head_dim explicitly get the default zoo's 64 / 4, whatever the width


FAMILIES = [
    _family("llama", _llama_like(tf.LlamaConfig), "rotary, GQA 4 query / 2 KV heads"),
    _family("mistral", _llama_like(tf.MistralConfig, sliding_window=12), "rotary, GQA, sliding window 12"),
    _family("qwen2", _llama_like(tf.Qwen2Config), "rotary, GQA, q/k/v bias"),
    _family("qwen3", _llama_like(tf.Qwen3Config, head_dim=_ZOO_HEAD_DIM), "rotary, GQA, per-head q/k RMSNorm"),
    _family("gemma2", _llama_like(
        tf.Gemma2Config, head_dim=_ZOO_HEAD_DIM, sliding_window=12, layer_types=["sliding_attention", "full_attention"],
        attn_logit_softcapping=50.0, final_logit_softcapping=30.0, query_pre_attn_scalar=_ZOO_HEAD_DIM,
    ), "softcapping, sliding window 12 on even layers"),
    _family("phi", _phi_config, "partial rotary (50%), dense output"),
]
