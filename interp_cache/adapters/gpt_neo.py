"""GPT-Neo: learned absolute positions, separate bias-free q/k/v projections, no score scaling, and layers
alternating between global and local (sliding-window) attention.

Numerics: the original forms scores from float32 q and k without any scale (`scaling=1.0`), keeps a key
while `0 <= query index - key index < window_size` on local layers (a sliding window of `window_size`, the
core's convention; indices and true positions differ by the same left padding for query and key), and
takes the softmax in float32 before casting to the value dtype: `score_dtype=float32`. `hook_pos_embed`
is the output of `wpe`. The attention module hooked is the inner `GPTNeoSelfAttention`; its outer wrapper
only forwards the call.
"""

from __future__ import annotations

from typing import Any

import torch
import transformers as tf
from torch import nn

from interp_cache.adapters.base import BlockLayout, Family, FamilyAdapter, LayerRunner, ZooShape
from interp_cache.core.attention import AttentionSpec


class GPTNeoAdapter(FamilyAdapter):
    family = "gpt_neo"
    learned_positions = True

    def decoder_layers(self, hf_model):
        return list(hf_model.transformer.h)

    def attention_module(self, layer):
        return layer.attn.attention

    def token_embedding(self, hf_model):
        return hf_model.transformer.wte

    def position_embedding(self, hf_model):
        return hf_model.transformer.wpe

    def attention_spec(self, hf_model, layer_idx, module) -> AttentionSpec:
        window = hf_model.config.window_size if module.attention_type == "local" else None
        return AttentionSpec(num_heads=module.num_heads, num_kv_heads=module.num_heads, head_dim=module.head_dim,
                             scaling=1.0, sliding_window=window, score_dtype=torch.float32)

    def project_qkv(self, module, hidden_states, call_kwargs):
        shape = (*hidden_states.shape[:-1], module.num_heads, module.head_dim)
        return (module.q_proj(hidden_states).view(shape), module.k_proj(hidden_states).view(shape),
                module.v_proj(hidden_states).view(shape))

    def project_out(self, module, z_bphd):
        out = z_bphd.reshape(*z_bphd.shape[:-2], -1).contiguous()
        return module.resid_dropout(module.out_proj(out))

    def block_layout(self, config) -> BlockLayout:
        return BlockLayout(mlp_out="mlp", resid_mid="ln_2", final_norm="transformer.ln_f")

    def make_forward(self, module: nn.Module, runner: LayerRunner):
        def forward(hidden_states: torch.Tensor, *args: Any, **kwargs: Any):
            return runner(hidden_states, {}), None

        return forward


def _zoo_config(shape: ZooShape, **overrides):
    return shape.build(tf.GPTNeoConfig, overrides, hidden_size=shape.hidden, num_layers=shape.layers,
                       num_heads=shape.heads, attention_types=[[["global", "local"], shape.layers // 2]],
                       window_size=12, max_position_embeddings=shape.max_positions,
                       initializer_range=shape.init_range, tie_word_embeddings=False)


FAMILIES = [Family("gpt_neo", GPTNeoAdapter(), "gpt_neo", _zoo_config,
                   "learned positions, unscaled float32 scores, global / local (window 12) layers")]
