"""What a family adapter is, and the one attention pipeline every adapter feeds.

An adapter knows where a family keeps its layers, embeddings and attention weights, and how it forms
q, k, v and the output projection. Everything after the projections -- hooks, rotary, the cache write
and read, the attention core -- is `AttentionLayerRunner`, shared by all families.

Adapters replace `forward` on the *instances* of the wrapped model's attention modules (never on their
classes), so a second, unwrapped model of the same family in the process still computes the original.
"""

from __future__ import annotations

import inspect
from typing import TYPE_CHECKING, Any, Callable

import torch
from torch import nn

from interp_cache.core.attention import AttentionSpec, attend
from interp_cache.core.hook_points import BlockHooks, run_hook

if TYPE_CHECKING:
    from interp_cache.core.context import ForwardContext


class FamilyAdapter:
    family: str = ""
    model_types: tuple[str, ...] = ()
    rotary: bool = False
    alibi: bool = False
    learned_positions: bool = False

    def matches(self, config) -> bool:
        return config.model_type in self.model_types

    # -- where things are -----------------------------------------------------------------------------
    def decoder_layers(self, hf_model: nn.Module) -> list[nn.Module]:
        raise NotImplementedError

    def attention_module(self, layer: nn.Module) -> nn.Module:
        raise NotImplementedError

    def token_embedding(self, hf_model: nn.Module) -> nn.Module:
        raise NotImplementedError

    def position_embedding(self, hf_model: nn.Module) -> nn.Module | None:
        return None

    def accepts_position_ids(self, hf_model: nn.Module) -> bool:
        return "position_ids" in inspect.signature(hf_model.forward).parameters

    # -- what attention computes ----------------------------------------------------------------------
    def attention_spec(self, hf_model: nn.Module, layer_idx: int, module: nn.Module) -> AttentionSpec:
        raise NotImplementedError

    def project_qkv(
        self, module: nn.Module, hidden_states: torch.Tensor, call_kwargs: dict[str, Any]
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """q `[b, p, h, d]`, k and v `[b, p, g, d]`, before positional encoding."""
        raise NotImplementedError

    def apply_rotary(
        self, module: nn.Module, q_bphd: torch.Tensor, k_bpgd: torch.Tensor, call_kwargs: dict[str, Any]
    ) -> tuple[torch.Tensor, torch.Tensor]:
        raise NotImplementedError

    def project_out(self, module: nn.Module, z_bphd: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def make_forward(self, module: nn.Module, runner: "AttentionLayerRunner") -> Callable:
        """The replacement `forward`: accept the family's call signature, return what its layer expects."""
        raise NotImplementedError


class AttentionLayerRunner:
    """One layer's hooked attention: projections -> hooks -> rotary -> cache -> core -> output."""

    def __init__(
        self,
        adapter: FamilyAdapter,
        module: nn.Module,
        layer_idx: int,
        spec: AttentionSpec,
        block_hooks: BlockHooks,
        context_source: Callable[[], "ForwardContext"],
    ):
        self.adapter = adapter
        self.module = module
        self.layer_idx = layer_idx
        self.spec = spec
        self.hooks = block_hooks
        self.context_source = context_source
        self.force_explicit = False

    def __call__(self, hidden_states: torch.Tensor, call_kwargs: dict[str, Any]) -> torch.Tensor:
        context = self.context_source()
        adapter, module, attn_hooks = self.adapter, self.module, self.hooks.attn
        q, k, v = adapter.project_qkv(module, hidden_states, call_kwargs)
        q = run_hook(attn_hooks.hook_q, q, context)
        k = run_hook(attn_hooks.hook_k, k, context)
        v = run_hook(attn_hooks.hook_v, v, context)
        if adapter.rotary:
            q, k = adapter.apply_rotary(module, q, k, call_kwargs)
            q = run_hook(attn_hooks.hook_rot_q, q, context)
            k = run_hook(attn_hooks.hook_rot_k, k, context)
        cache_layer = context.cache.layers[self.layer_idx]
        query_bhpd = q.transpose(1, 2)
        read = cache_layer.write_and_read(
            k.transpose(1, 2), v.transpose(1, 2), context, self.hooks.cache, query_bhpd, self.spec
        )
        z = attend(
            query_bhpd,
            read.keys,
            read.values,
            read.positions,
            self.spec,
            context,
            attn_hooks,
            cache_has_padding=cache_layer.has_padding or read.has_hidden,
            heads_share_positions=not read.per_head_positions,
            force_explicit=self.force_explicit,
        )
        if cache_layer.policy is not None:
            cache_layer.after_attention(query_bhpd, read.keys, read.positions, self.spec, context, self.hooks.cache)
        out = adapter.project_out(module, z)
        return run_hook(self.hooks.hook_attn_out, out, context)
