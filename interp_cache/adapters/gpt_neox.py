"""GPT-NeoX (Pythia): fused qkv laid out per head, partial half-split rotary, `dense` output.

Numerics: the original views `query_key_value(x)` as `[b, p, h, 3 * d]` and chunks the last axis into
q, k, v -- the fused weight interleaves q/k/v *per head*, not as three contiguous blocks -- and we do the
same. Rotary uses `position_embeddings=(cos, sin)` from the model's own `rotary_emb`, computed from the
true position ids, `[b, p, rotary_ndims]`; only the first `rotary_ndims = int(head_size *
partial_rotary_factor)` channels rotate (NeoX half-split layout), with the same elementwise ops as the
original's `apply_rotary_pos_emb`. Scale: `module.scaling = head_size**-0.5` on q.k^T, as the original.
The parallel residual (`use_parallel_residual`) lives in the decoder layer, which is left as it is.
"""

from __future__ import annotations

from typing import Any

import torch
import transformers as tf
from torch import nn

from interp_cache.adapters.base import PARALLEL_BLOCK, BlockLayout, Family, FamilyAdapter, LayerRunner, ZooShape
from interp_cache.core.attention import AttentionSpec
from interp_cache.core.rotary import apply_half_split_rotary


class GPTNeoXAdapter(FamilyAdapter):
    family = "gpt_neox"
    rotary = True
    alibi = False
    learned_positions = False

    def decoder_layers(self, hf_model):
        return list(hf_model.gpt_neox.layers)

    def attention_module(self, layer):
        return layer.attention

    def token_embedding(self, hf_model):
        return hf_model.gpt_neox.embed_in

    def attention_spec(self, hf_model, layer_idx, module) -> AttentionSpec:
        config = hf_model.config
        return AttentionSpec(
            num_heads=config.num_attention_heads,
            num_kv_heads=config.num_attention_heads,
            head_dim=module.head_size,
            scaling=module.scaling,
        )

    def project_qkv(self, module, hidden_states, call_kwargs):
        hidden_shape = (*hidden_states.shape[:-1], -1, 3 * module.head_size)
        qkv = module.query_key_value(hidden_states).view(hidden_shape)
        q, k, v = qkv.chunk(3, dim=-1)
        return q, k, v

    def apply_rotary(self, module, q_bphd, k_bpgd, call_kwargs):
        cos, sin = call_kwargs["position_embeddings"]
        return apply_half_split_rotary(q_bphd, cos, sin), apply_half_split_rotary(k_bpgd, cos, sin)

    def project_out(self, module, z_bphd):
        b, p = z_bphd.shape[:2]
        return module.dense(z_bphd.reshape(b, p, -1).contiguous())

    def block_layout(self, config) -> BlockLayout:
        if config.use_parallel_residual:
            return BlockLayout("mlp", None, "gpt_neox.final_layer_norm", f"use_parallel_residual=True: {PARALLEL_BLOCK}")
        return BlockLayout("mlp", "post_attention_layernorm", "gpt_neox.final_layer_norm")

    def make_forward(self, module: nn.Module, runner: LayerRunner):
        def forward(
            hidden_states: torch.Tensor,
            attention_mask=None,
            layer_past=None,
            position_embeddings=None,
            *args: Any,
            **kwargs: Any,
        ):
            if position_embeddings is None:
                raise ValueError("gpt_neox: the attention module needs position_embeddings=(cos, sin)")
            return runner(hidden_states, {"position_embeddings": position_embeddings}), None

        return forward


GPT_NEOX = GPTNeoXAdapter()


def _zoo_config(shape: ZooShape, **overrides):
    return shape.build(
        tf.GPTNeoXConfig, overrides, **shape.standard_fields(),
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": 0.25},
    )


FAMILIES = [Family("gpt_neox", GPT_NEOX, "gpt_neox", _zoo_config, "partial rotary (25%), parallel residual")]
