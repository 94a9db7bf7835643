"""GPT-J: separate bias-free q/k/v/out projections, interleaved (rotate-every-two) partial rotary.

Rotary: GPT-J has no model-level rotary module. Each attention module holds a float32 sinusoid table
`embed_positions` `[max_positions, rotary_dim]` (sin half, then cos half) and looks it up with the
`position_ids` its block passes in (the hooked model makes those the true, padding-aware positions).
We do the same lookup, cast to the key dtype as the original does (`.to(key.dtype)`), split into sin
and cos and repeat each entry twice (`repeat_interleave(2)`), then rotate the first `rotary_dim`
channels in the interleaved layout (channel 2i with 2i+1) with the same elementwise ops.
`rotary_dim=None` (rotary over all channels) is refused: transformers then builds the table over
`n_embd` rather than `head_dim`, which only broadcasts with a single head.

Scale: the original divides the float32 scores by `sqrt(head_dim)`; we multiply by `1/sqrt(head_dim)`
(exact when `sqrt(head_dim)` is a power of two: head_dim 16, 64, 256 -- GPT-J-6B has 256; then the
explicit path is bitwise the original. With e.g. head_dim 128 scores differ in the last bit.)
Upcast: the original always forms scores and softmax from float32 q and k; `score_dtype=float32` makes
the core do the same (half-precision GPT-J takes the explicit path for that reason).
"""

from __future__ import annotations

from typing import Any

import torch
import transformers as tf
from torch import nn

from interp_cache.adapters.base import PARALLEL_BLOCK, BlockLayout, Family, FamilyAdapter, LayerRunner, ZooShape
from interp_cache.core.attention import AttentionSpec
from interp_cache.core.rotary import apply_interleaved_rotary


class GPTJAdapter(FamilyAdapter):
    family = "gptj"
    rotary = True
    alibi = False
    learned_positions = False

    def decoder_layers(self, hf_model):
        return list(hf_model.transformer.h)

    def attention_module(self, layer):
        return layer.attn

    def token_embedding(self, hf_model):
        return hf_model.transformer.wte

    def attention_spec(self, hf_model, layer_idx, module) -> AttentionSpec:
        if module.rotary_dim is None:
            raise ValueError("gptj: rotary_dim=None (rotary over every channel) is not supported; set rotary_dim")
        return AttentionSpec(
            num_heads=module.num_attention_heads,
            num_kv_heads=module.num_attention_heads,
            head_dim=module.head_dim,
            scaling=1.0 / module.scale_attn,
            score_dtype=torch.float32,
        )

    def project_qkv(self, module, hidden_states, call_kwargs):
        b, p, _ = hidden_states.shape
        shape = (b, p, module.num_attention_heads, module.head_dim)
        q = module.q_proj(hidden_states).view(shape)
        k = module.k_proj(hidden_states).view(shape)
        v = module.v_proj(hidden_states).view(shape)
        return q, k, v

    def _cos_sin(self, module, position_ids: torch.Tensor, batch: int, dtype: torch.dtype):
        table = module.embed_positions
        if table.device != position_ids.device:
            table = table.to(position_ids.device)
        sincos = table[position_ids.expand(batch, -1)].to(dtype)  # [b, p, rotary_dim]
        sin, cos = torch.split(sincos, sincos.shape[-1] // 2, dim=-1)
        return torch.repeat_interleave(cos, 2, dim=-1), torch.repeat_interleave(sin, 2, dim=-1)

    def apply_rotary(self, module, q_bphd, k_bpgd, call_kwargs):
        position_ids = call_kwargs.get("position_ids")
        if position_ids is None:
            raise ValueError("gptj: the attention module needs position_ids (GPT-J computes rotary from them)")
        cos, sin = self._cos_sin(module, position_ids, q_bphd.shape[0], k_bpgd.dtype)
        return apply_interleaved_rotary(q_bphd, cos, sin), apply_interleaved_rotary(k_bpgd, cos, sin)

    def project_out(self, module, z_bphd):
        b, p = z_bphd.shape[:2]
        out = module.out_proj(z_bphd.reshape(b, p, -1).contiguous())
        return module.resid_dropout(out)

    def block_layout(self, config) -> BlockLayout:
        return BlockLayout("mlp", None, "transformer.ln_f", PARALLEL_BLOCK)

    def make_forward(self, module: nn.Module, runner: LayerRunner):
        def forward(
            hidden_states: torch.Tensor,
            layer_past=None,
            attention_mask=None,
            position_ids=None,
            *args: Any,
            **kwargs: Any,
        ):
            return runner(hidden_states, {"position_ids": position_ids}), None

        return forward


GPTJ = GPTJAdapter()


def _zoo_config(shape: ZooShape, **overrides):
    return shape.build(
        tf.GPTJConfig, overrides, n_embd=shape.hidden, n_layer=shape.layers, n_head=shape.heads, rotary_dim=8,
        n_positions=shape.max_positions, initializer_range=shape.init_range, tie_word_embeddings=False,
    )


FAMILIES = [Family("gptj", GPTJ, "gptj", _zoo_config, "interleaved rotary on 8 of 16 channels")]
