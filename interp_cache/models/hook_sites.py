"""Hook points read off a transformers module's input or output, with a torch hook there only while hooked.

The attention pipeline runs its own points (`adapters.runner`); everything around it -- embeddings,
the residual stream, the MLP's output, the final norm, and on the generic path the q/k/v projections
and the attention output -- is a *site*: a hook point and the torch hook that feeds it. A site's torch
hook is installed when its point gets a hook function and removed when the point has none, so an idle
model carries no torch hook at all (`sync`, called as each forward opens).

Where a hook replaces a module's output, the model continues with a copy of the replacement: some blocks
add to their MLP's output in place (Falcon's parallel block), and a tensor the caller handed in is theirs.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle

from interp_cache.core.context import ForwardContext
from interp_cache.core.hook_points import CachedDecodingHookPoint, run_hook

ContextSource = Callable[[], ForwardContext | None]  # the open forward's context (None between forwards)


def _replacement(result: torch.Tensor, activation: torch.Tensor) -> torch.Tensor | None:
    return None if result is activation else result.clone()


class ActivationSites:
    """The sites of one HookedModel: which points read which module, and the torch hooks now installed."""

    def __init__(self, context: ContextSource):
        self._context = context
        self._sites: list[tuple[CachedDecodingHookPoint, Callable[[], RemovableHandle]]] = []
        self._installed: dict[int, RemovableHandle] = {}

    def sync(self) -> None:
        """Install the torch hook of every hooked site, remove those of sites no longer hooked."""
        for index, (point, install) in enumerate(self._sites):
            handle = self._installed.get(index)
            if point._forward_hooks and handle is None:
                self._installed[index] = install()
            elif not point._forward_hooks and handle is not None:
                handle.remove()
                del self._installed[index]

    def remove_all(self) -> None:
        for handle in self._installed.values():
            handle.remove()
        self._installed.clear()

    def _add(self, point: CachedDecodingHookPoint, install: Callable[[], RemovableHandle]) -> None:
        self._sites.append((point, install))

    # -- kinds of site --------------------------------------------------------------------------------
    def output(self, point: CachedDecodingHookPoint, module: nn.Module, edited_in_place_after: bool = False) -> None:
        """`point` sees `module`'s output (the first element where it returns a tuple), shaped `[b, p, ...]`.
        `edited_in_place_after`: the caller writes into that output; it then continues with a copy."""

        def hook(module, args, output):
            context = self._context()
            if not point._forward_hooks or context is None:
                return None
            activation = output[0] if isinstance(output, tuple) else output
            # OPT's MLP runs on [b * p, d]
            shaped = activation.view(*context.positions.shape, -1) if activation.ndim == 2 else activation
            replaced = _replacement(run_hook(point, shaped, context.on(shaped.device)), shaped)
            if replaced is None:
                if not edited_in_place_after:
                    return None
                replaced = shaped.clone()
            replaced = replaced.view(activation.shape)
            return (replaced, *output[1:]) if isinstance(output, tuple) else replaced

        self._add(point, lambda: module.register_forward_hook(hook))

    def input(self, point: CachedDecodingHookPoint, module: nn.Module) -> None:
        """`point` sees `module`'s first input (`hidden_states`), and a replacement is what the module gets."""

        def hook(module, args, kwargs):
            context = self._context()
            if not point._forward_hooks or context is None:
                return None
            if args:
                return (run_hook(point, args[0], context.on(args[0].device)), *args[1:]), kwargs
            kwargs["hidden_states"] = run_hook(point, kwargs["hidden_states"], context.on(kwargs["hidden_states"].device))
            return args, kwargs

        self._add(point, lambda: module.register_forward_pre_hook(hook, with_kwargs=True))

    def shared_input(self, point: CachedDecodingHookPoint, module: nn.Module) -> None:
        """`point` sees `module`'s first input, a tensor the block also keeps as its residual: a replacement is
        written into that tensor in place, so the module *and* the residual sum after it see the patch."""

        def hook(module, args, kwargs):
            context = self._context()
            if not point._forward_hooks or context is None:
                return None
            activation = args[0] if args else kwargs["hidden_states"]
            shaped = activation.view(*context.positions.shape, activation.shape[-1])  # OPT: [b * p, d]
            result = run_hook(point, shaped, context.on(shaped.device))
            if result is not shaped:
                shaped.copy_(result)
            return None

        self._add(point, lambda: module.register_forward_pre_hook(hook, with_kwargs=True))

    def projection(self, point: CachedDecodingHookPoint, module: nn.Module, start: int, stop: int) -> None:
        """`point` (`[b, p, heads, head_dim]`) sees channels `start:stop` of a projection's output `[b, p, n]`
        (all of them for a separate q/k/v projection, a third-ish of a fused qkv one)."""
        heads, head_dim = point.layout.sizes[-2:]

        def hook(module, args, output):
            context = self._context()
            if not point._forward_hooks or context is None:
                return None
            part = output[..., start:stop]
            shaped = part.unflatten(-1, (heads, head_dim))
            replaced = _replacement(run_hook(point, shaped, context.on(shaped.device)), shaped)
            if replaced is None:
                return None
            if start == 0 and stop == output.shape[-1]:
                return replaced.flatten(-2)
            output = output.clone()
            output[..., start:stop] = replaced.flatten(-2)
            return output

        self._add(point, lambda: module.register_forward_hook(hook))
