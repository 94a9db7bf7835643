"""OPT: learned positions with offset 2, separate q/k/v/out projections with bias.

Numerics: the original scales the *query projection* by `head_dim**-0.5` before splitting heads
(`q_proj(x) * scaling`) and then runs attention with `scaling=1.0`. We do the same in `project_qkv`
and set `AttentionSpec.scaling = 1.0`, so scores are bitwise the original's (scaling q.k^T afterwards
would differ in the last bits). Consequence for hooks: `hook_q` (and `hook_z`'s inputs) see the
pre-scaled query, as in the original.

Positions: `embed_positions` (an `OPTLearnedPositionalEmbedding`) adds the offset of 2 itself; the
hooked model passes true position ids into the model forward, which hands them to it, so
`hook_pos_embed` is simply that module's output. `hook_embed` is the token embedding as it enters the
residual stream: the output of `project_in` when the model has one (`word_embed_proj_dim != hidden_size`,
e.g. opt-350m), else of `embed_tokens`.
"""

from __future__ import annotations

from typing import Any

import torch
import transformers as tf
from torch import nn

from interp_cache.adapters.base import BlockLayout, Family, FamilyAdapter, LayerRunner, ZooShape
from interp_cache.core.attention import AttentionSpec


class OPTAdapter(FamilyAdapter):
    family = "opt"
    rotary = False
    alibi = False
    learned_positions = True

    def decoder_layers(self, hf_model):
        return list(hf_model.model.decoder.layers)

    def attention_module(self, layer):
        return layer.self_attn

    def token_embedding(self, hf_model):
        decoder = hf_model.model.decoder
        return decoder.project_in if decoder.project_in is not None else decoder.embed_tokens

    def position_embedding(self, hf_model):
        return hf_model.model.decoder.embed_positions

    def attention_spec(self, hf_model, layer_idx, module) -> AttentionSpec:
        return AttentionSpec(
            num_heads=module.num_heads,
            num_kv_heads=module.num_heads,
            head_dim=module.head_dim,
            scaling=1.0,  # q is pre-scaled in project_qkv, as in the original
        )

    def project_qkv(self, module, hidden_states, call_kwargs):
        b, p, _ = hidden_states.shape
        shape = (b, p, module.num_heads, module.head_dim)
        q = (module.q_proj(hidden_states) * module.scaling).view(shape)
        k = module.k_proj(hidden_states).view(shape)
        v = module.v_proj(hidden_states).view(shape)
        return q, k, v

    def project_out(self, module, z_bphd):
        b, p = z_bphd.shape[:2]
        return module.out_proj(z_bphd.reshape(b, p, -1).contiguous())

    def block_layout(self, config) -> BlockLayout:
        # OPT has no MLP module: fc1 -> activation -> fc2 sit on the layer. Post-LN OPT (do_layer_norm_before=False,
        # e.g. opt-350m) feeds the normalised residual to fc1 and has no final norm.
        if config.do_layer_norm_before:
            final = None if getattr(config, "_remove_final_layer_norm", False) else "model.decoder.final_layer_norm"
            return BlockLayout("fc2", "final_layer_norm", final)
        return BlockLayout("fc2", "fc1", None, "do_layer_norm_before=False (post-LN): the decoder has no final norm")

    def make_forward(self, module: nn.Module, runner: LayerRunner):
        def forward(hidden_states: torch.Tensor, *args: Any, **kwargs: Any):
            return runner(hidden_states, {}), None

        return forward


OPT = OPTAdapter()


def _zoo_config(shape: ZooShape, **overrides):
    return shape.build(
        tf.OPTConfig, overrides, hidden_size=shape.hidden, num_hidden_layers=shape.layers,
        num_attention_heads=shape.heads, ffn_dim=2 * shape.hidden, word_embed_proj_dim=shape.hidden,
        max_position_embeddings=shape.max_positions, init_std=shape.init_range,
    )


FAMILIES = [Family("opt", OPT, "opt", _zoo_config, "learned positions with offset 2")]
