"""MPT: ALiBi from `build_mpt_alibi_tensor`, fused Wqkv (q | k | v blocks), optional clip_qkv / softmax_scale.

Numerical quirks of transformers' `MptAttention` / `MptModel` (5.23) and how they are matched:

* ALiBi. The model builds one table `slope * (j - (max_seq_len - 1))` for key *index* j (int32 index times
  float32 slope) and slices its last `key_length` columns, so the bias is `slope * (cache index -
  (key_length - 1))`: it is not padding-aware and carries a per-query-row constant. Softmax is invariant to
  a per-row constant, and with left padding `cache index = true position + pad count` (a per-row
  constant too), so `slope * true key position` -- the shared core's `alibi_bias` -- is the same
  function, and it stays right under caching and eviction where a cache index does not (the original
  also breaks past `max_seq_len` keys, where its table is too short; the core does not). The shift
  changes only rounding: biases `slope * (i - (k - 1))` in the original vs `slope * position` here, of
  the same magnitude; re-running the original with its bias replaced by `slope * true position` leaves
  the measured difference unchanged (4.4e-06), so what remains is SDPA-vs-eager float32 noise.
* bfloat16: the original adds its float32 `position_bias` to bfloat16 scores (promoting them to float32);
  the shared core casts the bias to the model dtype. Measured on the zoo model in bf16: max |hooked -
  original| logit 0.070, inside the bfloat16 noise floor (original bf16 vs original fp32: 0.13); forming
  scores in float32 (`score_dtype=torch.float32`) does not narrow it (0.074), so this is generic bf16
  rounding, not the bias dtype. Greedy generation in bf16 can diverge from the original's (as for BLOOM);
  float32 matches.
* Slopes: read off the model's own `build_mpt_alibi_tensor`, called as the model calls it -- *without*
  `alibi_bias_max`, i.e. with its default 8 (transformers ignores `attn_config.alibi_bias_max`).
* `attn_config.softmax_scale` (None -> `1/sqrt(head_dim)`) is the module's `softmax_scale` -> `scaling`.
* `attn_config.clip_qkv`: the fused projection is clamped to `[-clip_qkv, clip_qkv]` when truthy, before
  the split -- as in the original.
* Options transformers' `MptAttention` silently ignores (so neither it nor this adapter computes the
  checkpoint's function) raise a ValueError naming the option: `qk_ln=True`, `prefix_lm=True`,
  `attn_uses_sequence_id=True`, `alibi=False`, `attn_type` other than `multihead_attention`,
  `alibi_bias_max` other than 8.
* Attention dropout (`attn_pdrop`, training only) is not applied by the shared core.

Measured on the zoo model (float32, CPU, the tests' left-padded batch, logits up to ~7): max |hooked -
original(eager)| logit = 4.3e-06 (explicit-scores path 3.8e-06). Variants, same check, all <= 5.5e-06
with identical greedy generation: 8 heads, clip_qkv=0.5, softmax_scale=0.1.
"""

from __future__ import annotations

from typing import Any

import torch
import transformers as tf
from torch import nn

from interp_cache.adapters.base import BlockLayout, Family, FamilyAdapter, LayerRunner, ZooShape
from interp_cache.core.attention import AttentionSpec

_DEFAULT_ALIBI_BIAS_MAX = 8  # what MptModel.forward uses whatever the config says


def _check_attn_config(attn_config) -> None:
    def get(name, default=None):
        if isinstance(attn_config, dict):
            return attn_config.get(name, default)
        return getattr(attn_config, name, default)

    ignored_by_transformers = "transformers' MptAttention ignores it, so the model would not compute the checkpoint"
    if get("qk_ln", False):
        raise ValueError(f"mpt: attn_config option qk_ln=True is not supported ({ignored_by_transformers})")
    if get("prefix_lm", False):
        raise ValueError(f"mpt: attn_config option prefix_lm=True is not supported ({ignored_by_transformers})")
    if get("attn_uses_sequence_id", False):
        raise ValueError(
            f"mpt: attn_config option attn_uses_sequence_id=True is not supported ({ignored_by_transformers})"
        )
    if not get("alibi", True):
        raise ValueError(f"mpt: attn_config option alibi=False is not supported ({ignored_by_transformers})")
    attn_type = get("attn_type", "multihead_attention")
    if attn_type != "multihead_attention":
        raise ValueError(
            f"mpt: attn_config option attn_type={attn_type!r} is not supported ({ignored_by_transformers})"
        )
    bias_max = get("alibi_bias_max", _DEFAULT_ALIBI_BIAS_MAX)
    if bias_max != _DEFAULT_ALIBI_BIAS_MAX:
        raise ValueError(
            f"mpt: attn_config option alibi_bias_max={bias_max!r} is not supported (only "
            f"{_DEFAULT_ALIBI_BIAS_MAX}: {ignored_by_transformers})"
        )


class MptAdapter(FamilyAdapter):
    family = "mpt"
    rotary = False
    alibi = True
    learned_positions = False

    def decoder_layers(self, hf_model):
        return list(hf_model.transformer.blocks)

    def attention_module(self, layer):
        return layer.attn

    def token_embedding(self, hf_model):
        return hf_model.transformer.wte

    def attention_spec(self, hf_model, layer_idx, module) -> AttentionSpec:
        _check_attn_config(hf_model.config.attn_config)
        clip = module.clip_qkv
        if clip and not clip > 0:
            raise ValueError(f"mpt: attn_config option clip_qkv must be > 0 (or None); got {clip!r}")
        scale = module.softmax_scale
        if not scale > 0:
            raise ValueError(f"mpt: attn_config option softmax_scale must be > 0 (or None); got {scale!r}")
        num_heads = module.n_heads
        # [heads, 1, 2] = slope * (j - 1) for j in {0, 1}: the slope is column 1 minus column 0 (exact).
        table = hf_model.transformer.build_mpt_alibi_tensor(num_heads, 2, device=torch.device("cpu"))
        table = table.view(num_heads, 2).float()
        slopes = (table[:, 1] - table[:, 0]).clone()
        return AttentionSpec(
            num_heads=num_heads,
            num_kv_heads=num_heads,
            head_dim=module.head_dim,
            scaling=module.softmax_scale,
            alibi_slopes=slopes,
        )

    def project_qkv(self, module, hidden_states, call_kwargs):
        b, p, _ = hidden_states.shape
        mixed = module.Wqkv(hidden_states)
        if module.clip_qkv:
            mixed = mixed.clamp(min=-module.clip_qkv, max=module.clip_qkv)
        q, k, v = mixed.chunk(3, dim=2)
        shape = (b, p, module.n_heads, module.head_dim)
        return q.reshape(shape), k.reshape(shape), v.reshape(shape)

    def project_out(self, module, z_bphd):
        b, p = z_bphd.shape[:2]
        return module.out_proj(z_bphd.reshape(b, p, -1))

    def block_layout(self, config) -> BlockLayout:
        return BlockLayout("ffn.down_proj", "norm_2", "transformer.norm_f")  # MptMLP adds the residual itself

    def make_forward(self, module: nn.Module, runner: LayerRunner):
        def forward(
            hidden_states: torch.Tensor,
            position_bias: torch.Tensor | None = None,
            past_key_values: Any = None,
            attention_mask: torch.Tensor | None = None,
            **kwargs: Any,
        ):
            return runner(hidden_states, {}), None

        return forward


MPT = MptAdapter()


def _zoo_config(shape: ZooShape, **overrides):
    return shape.build(
        tf.MptConfig, overrides, d_model=shape.hidden, n_heads=shape.heads, n_layers=shape.layers, expansion_ratio=2,
        max_seq_len=shape.max_positions, initializer_range=shape.init_range,
        attn_config={"alibi": True, "alibi_bias_max": 8},
    )


FAMILIES = [Family("mpt", MPT, "mpt", _zoo_config, "ALiBi (alibi_bias_max 8)")]
