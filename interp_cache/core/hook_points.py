"""Hook points and the containers that give them their canonical names and layouts.

A hook point is TransformerLens' `HookPoint`: an identity module a hook function can read or replace.
What this module adds is the contract around calling one: a point nobody hooks costs one dict lookup,
each call tells the hook which decode step and which absolute positions it covers, a replacement
of the wrong shape or dtype is an error that names the hook, and every point carries its `HookLayout`
(kind, axes, sizes), declared here where the point is created.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass, replace

import torch
from torch import nn
from torch.nn.modules import module as module_hooks
from transformer_lens.hook_points import HookPoint

from interp_cache.core.context import ForwardContext
from interp_cache.core.hook_layout import HookKind, HookLayout


class HookShapeError(ValueError):
    """A hook returned a tensor that cannot replace the activation it was given."""


class NonFiniteHookOutput(ValueError):
    """A hook returned NaN, or +-inf where its layout gives infinities no meaning; greedy decoding would go on
    silently (emitting token 0), so the run stops at the hook. `model.check_hook_outputs = False` skips it."""


class CachedDecodingHookPoint(HookPoint):
    """A `HookPoint` that knows its layout and where in cached decoding it is being called.

    `hook.layout` is the activation's `HookLayout` and `hook.layer_idx` the layer (None outside the
    blocks). During a call, `hook.step` is the decode step (0 is the first forward on a cache, usually the
    prefill), `hook.positions` the true absolute positions `[b, p]` of the tokens of this forward,
    `hook.is_padding` `[b, p]` which of them are padding, and `hook.key_positions` the positions
    `[b, g, k]` of the cache entries attention reads (cache and attention hooks only).
    """

    check_outputs = True  # False: skip the NaN / inf check of what hooks return (`HookedModel.check_hook_outputs`)

    def __init__(self, layout: HookLayout, layer_idx: int | None = None):
        super().__init__()
        if not isinstance(layout, HookLayout):
            raise TypeError(f"a hook point needs a HookLayout; got {type(layout).__name__}")
        self.layout = layout
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
    context: ForwardContext,
    key_positions: torch.Tensor | None = None,
) -> torch.Tensor:
    """Pass `activation` through `point`; free when nothing is attached."""
    if not point._forward_hooks:
        return activation
    return run_hook_noting_change(point, activation, context, key_positions)[0]


def run_hook_noting_change(
    point: CachedDecodingHookPoint,
    activation: torch.Tensor,
    context: ForwardContext,
    key_positions: torch.Tensor | None = None,
) -> tuple[torch.Tensor, bool]:
    """`(result, changed)`: `run_hook`'s result, and whether a hook replaced the activation or edited it in
    place -- for callers that act differently on a patched value (a patched keep-set is checked, a patched
    read of values in storage is mixed instead of the storage)."""
    if not point._forward_hooks:
        return activation, False
    if activation.ndim != len(point.layout.axes):
        raise RuntimeError(
            f"{point.name!r} declares axes {point.layout.axes} but was called with shape {tuple(activation.shape)}"
        )
    # Plain attributes written straight to the instance: nn.Module.__setattr__ checks every assignment for
    # parameters, buffers and submodules, four times per hook call.
    point.__dict__.update(
        step=context.step, positions=context.positions, is_padding=context.is_padding, key_positions=key_positions
    )
    version_before = tensor_version(activation)
    result = _call_forward_hooks(point, activation)
    if not isinstance(result, torch.Tensor):
        raise HookShapeError(f"hook on {point.name!r} returned {type(result).__name__}; expected a tensor or None")
    if result.shape != activation.shape or result.dtype != activation.dtype:
        raise HookShapeError(
            f"hook on {point.name!r} returned shape {tuple(result.shape)} dtype {result.dtype}; "
            f"expected shape {tuple(activation.shape)} dtype {activation.dtype} (the activation it replaces)"
        )
    # Only what a hook wrote is checked: the activation returned untouched (every hook that only reads,
    # recording) is the model's own, and scanning it would cost more than the recording itself. An in-place
    # edit returns the same tensor but moves its version counter.
    untouched = result is activation and version_before is not None and tensor_version(result) == version_before
    if point.check_outputs and not untouched and result.is_floating_point():
        _check_finite(point, result, context)
    return result, not untouched


def _call_forward_hooks(point: CachedDecodingHookPoint, activation: torch.Tensor) -> torch.Tensor:
    """What `point(activation)` does for an identity module with plain forward hooks -- each hook sees the
    input and the result so far and may replace the result -- without nn.Module's call machinery (3 of the
    3.6 us a hook call cost). Anything else torch supports (pre-hooks, hooks with kwargs, global hooks)
    takes the module call."""
    if (point._forward_pre_hooks or point._forward_hooks_with_kwargs or module_hooks._global_forward_hooks
            or module_hooks._global_forward_pre_hooks):
        return point(activation)
    result = activation
    for hook in tuple(point._forward_hooks.values()):
        replaced = hook(point, (activation,), result)
        if replaced is not None:
            result = replaced
    return result


def tensor_version(tensor: torch.Tensor) -> int | None:
    """The tensor's in-place version counter; None for inference-mode tensors, which keep none."""
    try:
        return tensor._version
    except RuntimeError:
        return None


def _check_finite(point: CachedDecodingHookPoint, result: torch.Tensor, context: ForwardContext) -> None:
    """Raise where a value is NaN, or infinite where the layout does not allow it -- padding slots included:
    attention gives them weight ~0, and 0 * NaN spreads NaN into every real token that reads them."""
    bad = torch.isnan(result) if point.layout.infinities else ~torch.isfinite(result)
    token_axis = point.layout.token_axis
    if not bool(bad.any()):
        return
    where = [int(i) for i in bad.nonzero()[0].tolist()]
    what = "NaN" if bool(torch.isnan(result[tuple(where)])) else "inf"
    axes = ", ".join(f"{axis} {index}" for axis, index in zip(point.layout.axes, where))
    position = ""
    if token_axis is not None:
        position = f", absolute position {int(context.positions[where[0], where[token_axis]])}"
    allowed = "" if point.layout.infinities else " (+-inf has no meaning here either)"
    raise NonFiniteHookOutput(
        f"hook on {point.name!r} returned {what} at decode step {context.step}, {axes}{position}{allowed}; "
        f"{int(bad.sum())} value(s) in all. Set model.check_hook_outputs = False to skip this check."
    )


def check_hook_function(hook) -> None:
    """TransformerLens calls `hook(activation, hook=point)`: the function needs a parameter named `hook`."""
    if not callable(hook):
        raise TypeError(f"a hook function is callable as fn(activation, hook); got {type(hook).__name__}")
    try:
        parameters = inspect.signature(hook).parameters.values()
    except (TypeError, ValueError):  # no signature to read (some builtins): let the call itself decide
        return
    takes_hook = any(p.name == "hook" or p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters)
    if not takes_hook:
        names = ", ".join(p.name for p in parameters)
        raise TypeError(
            f"hook functions are called as fn(activation, hook=point), so the second parameter must be named "
            f"'hook'; {getattr(hook, '__qualname__', hook)!r} takes ({names})"
        )


@dataclass(frozen=True)
class HeadDims:
    """The sizes a layer's attention and cache hooks declare: query heads, KV heads, head dim, score dtype."""

    num_heads: int
    num_kv_heads: int
    head_dim: int
    score_dtype: torch.dtype | None = None  # scores and ALiBi bias formed in this dtype (GPT-J: float32)


def token_layout(width: int, dtype: torch.dtype | None = None) -> HookLayout:
    """`[b, p, width]`: the residual stream, embeddings, attention output."""
    return HookLayout.of(HookKind.TOKENS, dtype, batch=None, token=None, model=width)


POSITION_IDS_LAYOUT = HookLayout.of(HookKind.TOKENS, torch.long, "positions", batch=None, token=None)


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

    def __init__(self, layer_idx: int, heads: HeadDims, rotary: bool, alibi: bool, projections: bool = True):
        super().__init__()
        h, g, d = heads.num_heads, heads.num_kv_heads, heads.head_dim
        query = HookLayout.of(HookKind.TOKENS, batch=None, token=None, head=h, channel=d)
        key_value = HookLayout.of(HookKind.TOKENS, batch=None, token=None, kv_head=g, channel=d)
        scores = HookLayout.of(HookKind.KEYED, heads.score_dtype, batch=None, head=h, token=None, entry=None)
        if projections:  # absent where the module forms q, k, v in no module output that can be read
            self.hook_q = CachedDecodingHookPoint(query, layer_idx)
            self.hook_k = CachedDecodingHookPoint(key_value, layer_idx)
            self.hook_v = CachedDecodingHookPoint(key_value, layer_idx)
        if rotary:
            self.hook_rot_q = CachedDecodingHookPoint(query, layer_idx)
            self.hook_rot_k = CachedDecodingHookPoint(key_value, layer_idx)
        if alibi:
            self.hook_pos_bias = CachedDecodingHookPoint(scores, layer_idx)
        self.hook_attn_scores = CachedDecodingHookPoint(replace(scores, infinities=True), layer_idx)
        pattern = HookLayout.of(HookKind.KEYED, batch=None, head=h, token=None, entry=None)
        self.hook_pattern = CachedDecodingHookPoint(pattern, layer_idx)
        self.hook_z = CachedDecodingHookPoint(query, layer_idx)
        self._mirror_submodules()

    def needs_explicit_scores(self) -> bool:
        """Score and pattern hooks need the materialised attention matrix: SDPA never forms it."""
        return self.hook_attn_scores.is_hooked() or self.hook_pattern.is_hooked()


class CacheHooks(_HookContainer):
    """`blocks.{i}.cache.*`: what is written to, kept in and read from the layer's KV cache."""

    def __init__(self, layer_idx: int, heads: HeadDims):
        super().__init__()
        g, d = heads.num_kv_heads, heads.head_dim
        written = HookLayout.of(HookKind.TOKENS, batch=None, kv_head=g, token=None, channel=d)
        read = HookLayout.of(HookKind.ENTRIES, batch=None, kv_head=g, entry=None, channel=d)
        self.hook_k_write = CachedDecodingHookPoint(written, layer_idx)
        self.hook_v_write = CachedDecodingHookPoint(written, layer_idx)
        self.hook_scores = CachedDecodingHookPoint(
            HookLayout.of(HookKind.POLICY, infinities=True, batch=None, kv_head=g, choice=None), layer_idx)
        self.hook_keep = CachedDecodingHookPoint(
            HookLayout.of(HookKind.POLICY, torch.long, batch=None, kv_head=g, choice=None), layer_idx)
        self.hook_k_read = CachedDecodingHookPoint(read, layer_idx)
        self.hook_v_read = CachedDecodingHookPoint(read, layer_idx)
        self.hook_positions = CachedDecodingHookPoint(
            HookLayout.of(HookKind.ENTRIES, torch.long, "key_positions", batch=None, kv_head=g, entry=None), layer_idx)
        self._mirror_submodules()


@dataclass(frozen=True)
class BlockPoints:
    """Which of a block's optional hook points exist (a family declares them, `adapters.base.BlockLayout`)."""

    rotary: bool
    alibi: bool
    projections: bool = True  # hook_q / hook_k / hook_v
    mlp_out: bool = True
    resid_mid: bool = True


class BlockHooks(_HookContainer):
    """`blocks.{i}.*`: the residual stream around layer i, its attention, its cache and its MLP's output."""

    def __init__(self, layer_idx: int, heads: HeadDims, hidden_size: int, points: BlockPoints):
        super().__init__()
        residual = token_layout(hidden_size)
        self.hook_resid_pre = CachedDecodingHookPoint(residual, layer_idx)
        self.attn = AttentionHooks(layer_idx, heads, rotary=points.rotary, alibi=points.alibi,
                                   projections=points.projections)
        self.cache = CacheHooks(layer_idx, heads)
        self.hook_attn_out = CachedDecodingHookPoint(residual, layer_idx)
        if points.resid_mid:
            self.hook_resid_mid = CachedDecodingHookPoint(residual, layer_idx)
        if points.mlp_out:
            self.hook_mlp_out = CachedDecodingHookPoint(residual, layer_idx)
        self.hook_resid_post = CachedDecodingHookPoint(residual, layer_idx)
        self._mirror_submodules()


class FinalNormHooks(_HookContainer):
    """`ln_final.hook_normalized`: the residual stream after the final norm, what the unembedding reads."""

    def __init__(self, hidden_size: int):
        super().__init__()
        self.hook_normalized = CachedDecodingHookPoint(token_layout(hidden_size))
        self._mirror_submodules()
