"""CodeGen: GPT-J's block (parallel attention + MLP, interleaved partial rotary from a per-module float32
sinusoid table) with its own fused projection.

`qkv_proj` is laid out for 4-way model parallelism: its output splits into 4 chunks, each holding
`[q | v | k]` for a quarter of the heads (note v before k). We split it the same way. Rotary differs from
GPT-J's in one dtype detail: CodeGen does not cast the table to the key dtype, so q and k rotate in float32
and the key is cast back to the model dtype for the cache, as the original does; the query stays float32,
which is the dtype its scores are formed in anyway (`score_dtype=float32`). The original adds the mask and
then divides by `sqrt(head_dim)`; we multiply by its inverse (bitwise equal where the root is a power of two).
"""

from __future__ import annotations

import torch
import transformers as tf

from interp_cache.adapters.base import Family, ZooShape
from interp_cache.adapters.gptj import GPTJAdapter
from interp_cache.core.rotary import apply_interleaved_rotary

_MODEL_PARALLEL_CHUNKS = 4  # fixed in transformers' CodeGenAttention (mp_num)


class CodeGenAdapter(GPTJAdapter):
    family = "codegen"

    def attention_spec(self, hf_model, layer_idx, module):
        if module.num_attention_heads % _MODEL_PARALLEL_CHUNKS:
            raise ValueError(f"codegen: {module.num_attention_heads} heads do not split into the "
                             f"{_MODEL_PARALLEL_CHUNKS} chunks CodeGen's qkv_proj is laid out in")
        return super().attention_spec(hf_model, layer_idx, module)

    def project_qkv(self, module, hidden_states, call_kwargs):
        qkv = module.qkv_proj(hidden_states)
        chunks = qkv.unflatten(-1, (_MODEL_PARALLEL_CHUNKS, -1))  # [b, p, 4, 3 * heads/4 * d]
        local_width = module.head_dim * module.num_attention_heads // _MODEL_PARALLEL_CHUNKS
        query, value, key = torch.split(chunks, local_width, dim=-1)
        shape = (*hidden_states.shape[:-1], module.num_attention_heads, module.head_dim)
        return query.reshape(shape), key.reshape(shape), value.reshape(shape)

    def apply_rotary(self, module, q_bphd, k_bpgd, call_kwargs):
        position_ids = call_kwargs.get("position_ids")
        if position_ids is None:
            raise ValueError("codegen: the attention module needs position_ids (CodeGen computes rotary from them)")
        cos, sin = self._cos_sin(module, position_ids, q_bphd.shape[0], module.embed_positions.dtype)
        key = apply_interleaved_rotary(k_bpgd, cos, sin).to(k_bpgd.dtype)
        return apply_interleaved_rotary(q_bphd, cos, sin), key


def _zoo_config(shape: ZooShape, **overrides):
    return shape.build(
        tf.CodeGenConfig, overrides, n_embd=shape.hidden, n_layer=shape.layers, n_head=shape.heads, rotary_dim=8,
        n_positions=shape.max_positions, n_ctx=shape.max_positions, initializer_range=shape.init_range,
        tie_word_embeddings=False,
    )


FAMILIES = [Family("codegen", CodeGenAdapter(), "codegen", _zoo_config,
                   "GPT-J block, model-parallel q|v|k fused projection, float32 rotary")]
