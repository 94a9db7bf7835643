"""Falcon: rotary (Falcon-7B/40B style) and ALiBi (Falcon-RW style), fused query_key_value in three layouts.

One adapter class, two objects: `FALCON` (rotary; `config.alibi=False`) and `FALCON_ALIBI` (`alibi=True`).

Fused qkv layouts (`_split_heads` in transformers' `FalconAttention`), all handled:

* `new_decoder_architecture` (Falcon-40B/180B): `[groups, heads/groups + 2, head_dim]` -- the group's
  queries, then one key, then one value. Transformers broadcasts k/v to every head; here k/v keep their
  `num_kv_heads` groups (`[b, p, g, d]`) and the core runs grouped-query attention (same function).
* `multi_query` (Falcon-7B): `[heads + 2, head_dim]`, one shared key/value head (g = 1).
* otherwise (Falcon-RW): `[heads, 3, head_dim]`, q/k/v of one head adjacent (g = heads).

`query_key_value` and `dense` are `FalconLinear` (matmul and bias not fused); they are called as modules, so
that is reproduced. Scaling is `1/sqrt(head_dim)` on both paths.

Rotary: `position_embeddings=(cos, sin)` from the model's own rotary module (computed from the true
position ids the hooked model passes), applied with the half-split layout to `[b, p, heads, d]`.

ALiBi (Falcon-RW) quirks:

* `build_alibi_tensor` multiplies in bfloat16: `slopes.bfloat16() * position` (padding-aware positions,
  `(cumsum - 1) * mask`), then casts to the model dtype. Matched with `alibi_dtype=torch.bfloat16`; the
  slopes are read off transformers' own `build_alibi_tensor` (position 1 of a `[1, 2]` mask of ones), so
  they are the same bfloat16-rounded values.
* The SDPA path (transformers' default for Falcon) adds `alibi / sqrt(head_dim)` to the scaled scores,
  through the 4D mask the model builds with the bias folded in: `alibi_scale = 1/sqrt(head_dim)`.
* In transformers 5.23 the *eager* path adds the bias twice: once inside the attention module
  (`(q @ k^T + alibi) * inv_norm_factor`) and once more through that same alibi-folded causal mask, i.e.
  `2 * alibi / sqrt(head_dim)` -- a transformers bug (the eager and SDPA models are different functions).
  This adapter matches SDPA, which is the Falcon-RW definition (bias once, divided by sqrt(head_dim)).
  Measured on the zoo model `falcon_alibi` (float32, CPU, the tests' left-padded batch, logits up to
  ~6): max |original(eager) - original(sdpa)| logit = 1.33 (also 1.33 on the unpadded row alone), while
  max |hooked - original(sdpa)| = 0 and a hooked run with the bias doubled (`alibi_scale = 2/sqrt(d)`)
  matches eager to 4.3e-06 -- confirming the double-add diagnosis. The rotary path has no such
  difference (eager vs sdpa: 0).

The model's `alibi` tensor and its attention mask are ignored: the shared core computes the bias from the
stored true key positions and the mask from the position-true visibility rule, so both stay right under
caching and eviction. Attention dropout (training only) is not applied by the shared core.

Measured (float32, CPU, zoo, the tests' left-padded batch): max |hooked - original(sdpa)| logit:
falcon 2.1e-06, falcon_alibi 0 (bitwise; explicit-scores path 4.0e-06). Variants checked the same way,
all <= 3.9e-06 with identical greedy generation: new_decoder_architecture with 8 heads / 2 kv groups
(num_ln_in_parallel_attn 1 and 2), multi_query=False + sequential attention, falcon_alibi with
multi_query, with 8 heads, and with new_decoder_architecture. falcon_alibi in bfloat16: 0 (bitwise).
"""

from __future__ import annotations

from typing import Any

import torch
import transformers as tf
from torch import nn
from transformers.models.falcon.modeling_falcon import build_alibi_tensor

from interp_cache.adapters.base import PARALLEL_BLOCK, BlockLayout, Family, FamilyAdapter, LayerRunner, ZooShape
from interp_cache.core.attention import AttentionSpec
from interp_cache.core.rotary import apply_half_split_rotary


class FalconAdapter(FamilyAdapter):
    learned_positions = False

    def __init__(self, use_alibi: bool):
        self.alibi = use_alibi
        self.rotary = not use_alibi
        self.family = "falcon_alibi" if use_alibi else "falcon"

    def decoder_layers(self, hf_model):
        return list(hf_model.transformer.h)

    def attention_module(self, layer):
        return layer.self_attention

    def token_embedding(self, hf_model):
        return hf_model.transformer.word_embeddings

    @staticmethod
    def _num_kv_heads(module) -> int:
        if module.new_decoder_architecture:
            return module.config.num_kv_heads
        if module.multi_query:
            return 1
        return module.num_heads

    def attention_spec(self, hf_model, layer_idx, module) -> AttentionSpec:
        config = hf_model.config
        if bool(config.alibi) != self.alibi:
            raise ValueError(
                f"the {self.family} adapter needs config.alibi={self.alibi}; got alibi={config.alibi} "
                f"(use the {'falcon_alibi' if config.alibi else 'falcon'} family)"
            )
        num_heads, num_kv_heads = module.num_heads, self._num_kv_heads(module)
        if num_heads % num_kv_heads != 0:
            raise ValueError(
                f"falcon: config option num_kv_heads={num_kv_heads} must divide num_attention_heads={num_heads}"
            )
        slopes = None
        alibi_scale = 1.0
        if self.alibi:
            ones = torch.ones(1, 2, dtype=torch.long)
            # [heads, 1, 2]: bfloat16(slope) * position; position 1 is the bfloat16-rounded slope.
            slopes = build_alibi_tensor(ones, num_heads, torch.float32).view(num_heads, 2)[:, 1].clone()
            alibi_scale = 1.0 / (module.head_dim**0.5)
        return AttentionSpec(
            num_heads=num_heads,
            num_kv_heads=num_kv_heads,
            head_dim=module.head_dim,
            scaling=module.inv_norm_factor,
            alibi_slopes=slopes,
            alibi_scale=alibi_scale,
            alibi_dtype=torch.bfloat16 if self.alibi else None,
        )

    def project_qkv(self, module, hidden_states, call_kwargs):
        b, p, _ = hidden_states.shape
        d = module.head_dim
        fused = module.query_key_value(hidden_states)
        if module.new_decoder_architecture:
            g = module.config.num_kv_heads
            qkv = fused.view(b, p, g, module.num_heads // g + 2, d)
            return qkv[:, :, :, :-2].flatten(2, 3), qkv[:, :, :, -2], qkv[:, :, :, -1]
        if module.multi_query:
            qkv = fused.view(b, p, module.num_heads + 2, d)
            return qkv[:, :, :-2], qkv[:, :, -2:-1], qkv[:, :, -1:]
        qkv = fused.view(b, p, module.num_heads, 3, d)
        return qkv[..., 0, :], qkv[..., 1, :], qkv[..., 2, :]

    def apply_rotary(self, module, q_bphd, k_bpgd, call_kwargs):
        cos, sin = call_kwargs["position_embeddings"]
        return apply_half_split_rotary(q_bphd, cos, sin), apply_half_split_rotary(k_bpgd, cos, sin)

    def project_out(self, module, z_bphd):
        b, p = z_bphd.shape[:2]
        return module.dense(z_bphd.reshape(b, p, -1))

    def block_layout(self, config) -> BlockLayout:
        if config.new_decoder_architecture or config.parallel_attn:
            # `mlp_output += attention_output`: in place, after the MLP returned
            return BlockLayout("mlp", None, "transformer.ln_f", PARALLEL_BLOCK, mlp_out_added_to_in_place=True)
        return BlockLayout("mlp", "post_attention_layernorm", "transformer.ln_f")

    def make_forward(self, module: nn.Module, runner: LayerRunner):
        def forward(
            hidden_states: torch.Tensor,
            alibi: torch.Tensor | None = None,
            attention_mask: torch.Tensor | None = None,
            position_ids: torch.Tensor | None = None,
            layer_past: Any = None,
            use_cache: bool = False,
            output_attentions: bool = False,
            position_embeddings: tuple[torch.Tensor, torch.Tensor] | None = None,
            **kwargs: Any,
        ):
            return runner(hidden_states, {"position_embeddings": position_embeddings}), None

        return forward


FALCON = FalconAdapter(use_alibi=False)
FALCON_ALIBI = FalconAdapter(use_alibi=True)


def _zoo_config(alibi: bool):
    def make(shape: ZooShape, **overrides):
        return shape.build(
            tf.FalconConfig, overrides, hidden_size=shape.hidden, num_hidden_layers=shape.layers,
            num_attention_heads=shape.heads, max_position_embeddings=shape.max_positions,
            initializer_range=shape.init_range, alibi=alibi, new_decoder_architecture=False,
            # Falcon-7B style (rotary): multi-query, parallel attention; Falcon-RW style (ALiBi): neither.
            multi_query=not alibi, parallel_attn=not alibi, bias=alibi,
        )

    return make


FAMILIES = [
    Family("falcon", FALCON, "falcon", _zoo_config(alibi=False), "rotary, multi-query, parallel attention",
           config_flag=("alibi", False)),
    Family("falcon_alibi", FALCON_ALIBI, "falcon", _zoo_config(alibi=True),
           "ALiBi (Falcon-RW style), bfloat16 bias table", config_flag=("alibi", True)),
]
