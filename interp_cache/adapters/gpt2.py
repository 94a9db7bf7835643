"""GPT-2: learned absolute positions, fused qkv `Conv1D` (`c_attn`) and `Conv1D` output (`c_proj`).

Numerics: the original splits `c_attn(x)` into q, k, v and views each as `[b, p, h, d]`; we do the same
(minus the transpose, which moves no values). Its scale is the precomputed `module.scaling`
(`head_dim**-0.5` when `scale_attn_weights`, further divided by `layer_idx + 1` when
`scale_attn_by_inverse_layer_idx`), applied to q.k^T exactly as SDPA/eager apply it, so
`AttentionSpec.scaling = module.scaling`.

`reorder_and_upcast_attn` only changes anything on the eager path, where it computes scores in float32
with `baddbmm(alpha=scaling)`; for a float32 model that is the same function up to rounding, so it is
accepted there and refused otherwise. Cross-attention (`add_cross_attention`) is refused: it needs an
encoder-decoder cache. `hook_pos_embed` is the output of `wpe`.
"""

from __future__ import annotations

from typing import Any

import torch
import transformers as tf
from torch import nn

from interp_cache.adapters.base import BlockLayout, Family, FamilyAdapter, LayerRunner, ZooShape
from interp_cache.core.attention import AttentionSpec


class GPT2Adapter(FamilyAdapter):
    family = "gpt2"
    rotary = False
    alibi = False
    learned_positions = True

    def decoder_layers(self, hf_model):
        return list(hf_model.transformer.h)

    def attention_module(self, layer):
        return layer.attn

    def token_embedding(self, hf_model):
        return hf_model.transformer.wte

    def position_embedding(self, hf_model):
        return hf_model.transformer.wpe

    def attention_spec(self, hf_model, layer_idx, module) -> AttentionSpec:
        config = hf_model.config
        if getattr(config, "add_cross_attention", False):
            raise ValueError("gpt2: add_cross_attention=True (cross-attention blocks) is not supported")
        if getattr(config, "reorder_and_upcast_attn", False):
            dtype = next(hf_model.parameters()).dtype
            if config._attn_implementation == "eager" and dtype != torch.float32:
                raise ValueError(
                    "gpt2: reorder_and_upcast_attn=True with eager attention in "
                    f"{dtype} (float32 score upcast) is not supported"
                )
        return AttentionSpec(
            num_heads=module.num_heads,
            num_kv_heads=module.num_heads,
            head_dim=module.head_dim,
            scaling=module.scaling,
        )

    def project_qkv(self, module, hidden_states, call_kwargs):
        query, key, value = module.c_attn(hidden_states).split(module.split_size, dim=2)
        shape = (*hidden_states.shape[:-1], -1, module.head_dim)
        return query.view(shape), key.view(shape), value.view(shape)

    def project_out(self, module, z_bphd):
        out = z_bphd.reshape(*z_bphd.shape[:-2], -1).contiguous()
        return module.resid_dropout(module.c_proj(out))

    def block_layout(self, config) -> BlockLayout:
        return BlockLayout(mlp_out="mlp", resid_mid="ln_2", final_norm="transformer.ln_f")

    def make_forward(self, module: nn.Module, runner: LayerRunner):
        def forward(hidden_states: torch.Tensor, *args: Any, **kwargs: Any):
            if kwargs.get("encoder_hidden_states") is not None:
                raise ValueError("gpt2: cross-attention (encoder_hidden_states) is not supported")
            return runner(hidden_states, {}), None

        return forward


GPT2 = GPT2Adapter()


def _zoo_config(shape: ZooShape, **overrides):
    return shape.build(tf.GPT2Config, overrides, n_embd=shape.hidden, n_layer=shape.layers, n_head=shape.heads,
                       n_positions=shape.max_positions, initializer_range=shape.init_range)


FAMILIES = [Family("gpt2", GPT2, "gpt2", _zoo_config, "learned absolute positions")]
