"""Hook points and the containers that give them their canonical names.

A hook point is TransformerLens' `HookPoint`: an identity module a hook function can read or replace.
What this module adds is the contract around calling one: a point nobody hooks costs one dict lookup,
each call tells the hook which decode step and which absolute positions it covers, and a replacement
of the wrong shape or dtype is an error that names the hook.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import nn
from transformer_lens.hook_points import HookPoint

if TYPE_CHECKING:
    from interp_cache.core.context import ForwardContext


class HookShapeError(ValueError):
    """A hook returned a tensor that cannot replace the activation it was given."""


class CachedDecodingHookPoint(HookPoint):
    """A `HookPoint` that knows where in cached decoding it is being called.

    During a call, `hook.step` is the decode step (0 is the first forward on a cache, usually the
    prefill), `hook.positions` the true absolute positions `[b, p]` of the tokens of this forward,
    `hook.is_padding` `[b, p]` which of them are padding,
    `hook.key_positions` the positions `[b, g, k]` of the cache entries attention reads (cache and
    attention hooks only) and `hook.layer_idx` the layer (None outside the blocks).
    """

    def __init__(self, layer_idx: int | None = None):
        super().__init__()
        self.layer_idx = layer_idx
        self.step: int | None = None
        self.positions: torch.Tensor | None = None
        self.is_padding: torch.Tensor | None = None
        self.key_positions: torch.Tensor | None = None

    def is_hooked(self) -> bool:
        return bool(self._forward_hooks)


def run_hook(
    point: CachedDecodingHookPoint,
    activation: torch.Tensor,
    context: "ForwardContext",
    key_positions: torch.Tensor | None = None,
) -> torch.Tensor:
    """Pass `activation` through `point`; free when nothing is attached."""
    if not point._forward_hooks:
        return activation
    point.step = context.step
    point.positions = context.positions
    point.is_padding = context.is_padding
    point.key_positions = key_positions
    result = point(activation)
    if not isinstance(result, torch.Tensor):
        raise HookShapeError(f"hook on {point.name!r} returned {type(result).__name__}; expected a tensor or None")
    if result.shape != activation.shape or result.dtype != activation.dtype:
        raise HookShapeError(
            f"hook on {point.name!r} returned shape {tuple(result.shape)} dtype {result.dtype}; "
            f"expected shape {tuple(activation.shape)} dtype {activation.dtype} (the activation it replaces)"
        )
    return result


class _HookContainer(nn.Module):
    """A module of hook points whose attribute access skips `nn.Module.__getattr__`.

    Hook points are read on every forward of every layer; mirroring them into the instance dict makes
    that a plain attribute lookup. They stay registered submodules, so names and `named_modules` hold.
    """

    def _mirror_submodules(self) -> None:
        for name, module in self._modules.items():
            self.__dict__[name] = module


class AttentionHooks(_HookContainer):
    """`blocks.{i}.attn.*`: projections, positional encoding, scores, pattern and z."""

    def __init__(self, layer_idx: int, rotary: bool, alibi: bool):
        super().__init__()
        self.hook_q = CachedDecodingHookPoint(layer_idx)
        self.hook_k = CachedDecodingHookPoint(layer_idx)
        self.hook_v = CachedDecodingHookPoint(layer_idx)
        if rotary:
            self.hook_rot_q = CachedDecodingHookPoint(layer_idx)
            self.hook_rot_k = CachedDecodingHookPoint(layer_idx)
        if alibi:
            self.hook_pos_bias = CachedDecodingHookPoint(layer_idx)
        self.hook_attn_scores = CachedDecodingHookPoint(layer_idx)
        self.hook_pattern = CachedDecodingHookPoint(layer_idx)
        self.hook_z = CachedDecodingHookPoint(layer_idx)
        self._mirror_submodules()

    def needs_explicit_scores(self) -> bool:
        """Score and pattern hooks need the materialised attention matrix: SDPA never forms it."""
        return self.hook_attn_scores.is_hooked() or self.hook_pattern.is_hooked()


class CacheHooks(_HookContainer):
    """`blocks.{i}.cache.*`: what is written to, kept in and read from the layer's KV cache."""

    def __init__(self, layer_idx: int):
        super().__init__()
        self.hook_k_write = CachedDecodingHookPoint(layer_idx)
        self.hook_v_write = CachedDecodingHookPoint(layer_idx)
        self.hook_scores = CachedDecodingHookPoint(layer_idx)
        self.hook_keep = CachedDecodingHookPoint(layer_idx)
        self.hook_k_read = CachedDecodingHookPoint(layer_idx)
        self.hook_v_read = CachedDecodingHookPoint(layer_idx)
        self.hook_positions = CachedDecodingHookPoint(layer_idx)
        self._mirror_submodules()


class BlockHooks(_HookContainer):
    """`blocks.{i}.*`: the residual stream around layer i, its attention and its cache."""

    def __init__(self, layer_idx: int, rotary: bool, alibi: bool):
        super().__init__()
        self.hook_resid_pre = CachedDecodingHookPoint(layer_idx)
        self.attn = AttentionHooks(layer_idx, rotary=rotary, alibi=alibi)
        self.cache = CacheHooks(layer_idx)
        self.hook_attn_out = CachedDecodingHookPoint(layer_idx)
        self.hook_resid_post = CachedDecodingHookPoint(layer_idx)
        self._mirror_submodules()
