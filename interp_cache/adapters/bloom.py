"""BLOOM: ALiBi, a fused per-head-interleaved query_key_value, residual added inside the attention module.

Numerical quirks of transformers' `BloomAttention` (5.23) and how they are matched:

* ALiBi. The model builds `slope * ((attention_mask.cumsum(-1) - 1) * attention_mask)` in float32 (then casts
  to the model dtype), i.e. `slope * true key position`, and adds it to the scores through
  `alibi.baddbmm(q, k^T, beta=1, alpha=inv_norm_factor)`. That is exactly the shared core's
  `alibi_bias` (float32 product, cast to the model dtype, scale 1), so `alibi_slopes` are read off
  transformers' own `build_alibi_tensor` (position 1 of a `[1, 2]` mask of ones) and the model's `alibi`
  tensor and 4D mask are ignored: the core computes bias and mask from the stored true key positions,
  which stays right under caching and eviction.
* Scores: `inv_norm_factor = 1/sqrt(head_dim)` (beta = 1) -> `scaling`. Softmax in float32, as the core.
* Fused qkv: the output of `query_key_value` is laid out per head as `[heads, 3, head_dim]`
  (q, k, v of one head adjacent), not `[3, heads, head_dim]`.
* The attention module itself adds the residual (`dropout_add(out, residual, hidden_dropout, training)`):
  `make_forward` does that around the runner, so `hook_attn_out` is the output projection alone.
* `pretraining_tp > 1` with `slow_but_exact=True`: the output projection is a sum of `pretraining_tp`
  column slices through `F.linear` *without the dense bias* (transformers drops it on that path). This is
  reproduced as is (same slices, same summation order). Any other value combination uses `dense`.
* Attention dropout (training only) is not applied by the shared core.

Measured on the zoo model (float32, CPU, the tests' left-padded batch, logits up to ~6 in magnitude):
max |hooked - original(eager)| logit = 3.5e-06 (explicit-scores path: 0, bitwise equal). Variants checked
the same way, all <= 7.7e-06 with identical greedy generation: 6 heads (non-power-of-2 slopes),
pretraining_tp=2 + slow_but_exact, apply_residual_connection_post_layernorm. bfloat16: 0.094, inside
the bfloat16 noise floor (original bf16 vs original fp32: 0.10); greedy generation in bf16 can diverge
from the original's (bf16 rounding), float32 matches.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
import transformers as tf
from torch import nn
from transformers.models.bloom.modeling_bloom import dropout_add

from interp_cache.adapters.base import BlockLayout, Family, FamilyAdapter, LayerRunner, ZooShape
from interp_cache.core.attention import AttentionSpec


class BloomAdapter(FamilyAdapter):
    family = "bloom"
    rotary = False
    alibi = True
    learned_positions = False

    def decoder_layers(self, hf_model):
        return list(hf_model.transformer.h)

    def attention_module(self, layer):
        return layer.self_attention

    def token_embedding(self, hf_model):
        return hf_model.transformer.word_embeddings

    def attention_spec(self, hf_model, layer_idx, module) -> AttentionSpec:
        tp = getattr(module, "pretraining_tp", 1)
        if not isinstance(tp, int) or tp < 1:
            raise ValueError(f"bloom: config option pretraining_tp must be an integer >= 1; got {tp!r}")
        if tp > 1 and module.slow_but_exact and module.hidden_size % tp != 0:
            raise ValueError(
                f"bloom: config option pretraining_tp={tp} with slow_but_exact=True needs hidden_size "
                f"({module.hidden_size}) divisible by pretraining_tp (unsupported: uneven slices)"
            )
        if getattr(module, "beta", 1.0) != 1.0:
            raise ValueError(f"bloom: attention beta={module.beta} is not supported (only 1.0)")
        num_heads = module.num_heads
        ones = torch.ones(1, 2, dtype=torch.long)
        # [heads, 1, 2]: slope * position; position 1 is the slope itself (float32, as the model uses it).
        table = hf_model.transformer.build_alibi_tensor(ones, num_heads, torch.float32)
        slopes = table.view(num_heads, 2)[:, 1].clone()
        return AttentionSpec(
            num_heads=num_heads,
            num_kv_heads=num_heads,
            head_dim=module.head_dim,
            scaling=module.inv_norm_factor,
            alibi_slopes=slopes,
        )

    def project_qkv(self, module, hidden_states, call_kwargs):
        b, p, _ = hidden_states.shape
        fused = module.query_key_value(hidden_states).view(b, p, module.num_heads, 3, module.head_dim)
        return fused[..., 0, :], fused[..., 1, :], fused[..., 2, :]

    def project_out(self, module, z_bphd):
        b, p = z_bphd.shape[:2]
        context = z_bphd.reshape(b, p, -1)
        tp = module.pretraining_tp
        if tp > 1 and module.slow_but_exact:
            slices = module.hidden_size / tp
            out = torch.zeros_like(context)
            for i in range(tp):
                lo, hi = int(i * slices), int((i + 1) * slices)
                out = out + F.linear(context[:, :, lo:hi], module.dense.weight[:, lo:hi])
            return out
        return module.dense(context)

    def block_layout(self, config) -> BlockLayout:
        absent = []
        mlp_out = "mlp.dense_4h_to_h"
        if config.pretraining_tp > 1 and config.slow_but_exact:
            mlp_out = None  # the MLP then applies dense_4h_to_h's weight slice by slice, never calling the module
            absent.append("pretraining_tp > 1 with slow_but_exact: the MLP output is never formed as one module output")
        resid_mid = "post_attention_layernorm"
        if config.apply_residual_connection_post_layernorm:
            resid_mid = None  # the residual is then the normalised stream itself: no single tensor to patch
            absent.append("apply_residual_connection_post_layernorm=True: the residual is the normalised stream")
        return BlockLayout(mlp_out, resid_mid, "transformer.ln_f", "; ".join(absent))

    def make_forward(self, module: nn.Module, runner: LayerRunner):
        def forward(hidden_states: torch.Tensor, residual: torch.Tensor, *args: Any, **kwargs: Any):
            attn_out = runner(hidden_states, {})
            return dropout_add(attn_out, residual, module.hidden_dropout, module.training), None

        return forward


BLOOM = BloomAdapter()


def _zoo_config(shape: ZooShape, **overrides):
    return shape.build(tf.BloomConfig, overrides, hidden_size=shape.hidden, n_layer=shape.layers, n_head=shape.heads,
                       initializer_range=shape.init_range)


FAMILIES = [Family("bloom", BLOOM, "bloom", _zoo_config, "ALiBi, fused qkv")]
