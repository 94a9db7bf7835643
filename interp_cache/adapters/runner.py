"""The one attention pipeline every family adapter feeds: projections -> hooks -> rotary -> cache -> core -> output."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from interp_cache.adapters.base import FamilyAdapter
from interp_cache.cache.layer import HookedCacheLayer
from interp_cache.core.attention import AttentionSpec, attend
from interp_cache.core.received import attend_and_receive, can_attend_and_receive
from interp_cache.core.context import ForwardContext
from interp_cache.core.hook_points import BlockHooks, run_hook


class AttentionLayerRunner:
    """One layer's hooked attention: projections -> hooks -> rotary -> cache -> core -> output.

    `forward_source(layer_idx)` gives the open forward's context and this layer of its cache.
    """

    def __init__(
        self,
        adapter: FamilyAdapter,
        module: nn.Module,
        layer_idx: int,
        spec: AttentionSpec,
        block_hooks: BlockHooks,
        forward_source: Callable[[int], tuple[ForwardContext, HookedCacheLayer]],
    ):
        self.adapter = adapter
        self.module = module
        self.layer_idx = layer_idx
        self.spec = spec
        self.hooks = block_hooks
        self.forward_source = forward_source
        self.force_explicit = False

    def __call__(self, hidden_states: torch.Tensor, call_kwargs: dict[str, Any]) -> torch.Tensor:
        context, cache_layer = self.forward_source(self.layer_idx)
        context = context.on(hidden_states.device)
        adapter, module, attn_hooks = self.adapter, self.module, self.hooks.attn
        q, k, v = adapter.project_qkv(module, hidden_states, call_kwargs)
        q = run_hook(attn_hooks.hook_q, q, context)
        k = run_hook(attn_hooks.hook_k, k, context)
        v = run_hook(attn_hooks.hook_v, v, context)
        if adapter.rotary:
            q, k = adapter.apply_rotary(module, q, k, call_kwargs)
        z = self._attend(context, cache_layer, q, k, v)
        out = adapter.project_out(module, z)
        return run_hook(self.hooks.hook_attn_out, out, context)

    def attend_rotated(self, query_bhpd: torch.Tensor, key_bgpd: torch.Tensor, value_bgpd: torch.Tensor) -> torch.Tensor:
        """From q, k (positionally encoded) and v as transformers' attention interface hands them over, to z
        `[b, p, h, d]`: the generic path (`adapters.attention_interface`)."""
        context, cache_layer = self.forward_source(self.layer_idx)
        context = context.on(query_bhpd.device)
        return self._attend(context, cache_layer, query_bhpd.transpose(1, 2), key_bgpd.transpose(1, 2),
                            value_bgpd.transpose(1, 2))

    def _attend(self, context: ForwardContext, cache_layer: HookedCacheLayer, q_bphd: torch.Tensor,
                k_bpgd: torch.Tensor, v_bpgd: torch.Tensor) -> torch.Tensor:
        attn_hooks = self.hooks.attn
        if self.adapter.rotary:
            q_bphd = run_hook(attn_hooks.hook_rot_q, q_bphd, context)
            k_bpgd = run_hook(attn_hooks.hook_rot_k, k_bpgd, context)
        query_bhpd = q_bphd.transpose(1, 2)
        read = cache_layer.write_and_read(
            k_bpgd.transpose(1, 2), v_bpgd.transpose(1, 2), context, self.hooks.cache, query_bhpd, self.spec
        )
        received_bhk = None
        if (cache_layer.wants_received_attention(query_bhpd, read, self.spec, context)
                and can_attend_and_receive(query_bhpd, read, self.spec, attn_hooks, self.force_explicit)):
            z, received_bhk = attend_and_receive(query_bhpd, read, self.spec, context, attn_hooks)
        else:
            z = attend(query_bhpd, read, self.spec, context, attn_hooks, self.force_explicit)
        if cache_layer.policy is not None:
            cache_layer.after_attention(query_bhpd, read, self.spec, context, self.hooks.cache, received_bhk)
        return z
