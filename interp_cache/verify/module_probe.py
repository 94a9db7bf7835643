"""What a plain transformers model computed and was given at each forward, seen through PyTorch module hooks
alone: no cooperation from the user's decode loop, cache class or attention code is needed.

Per forward (a decode step): the new tokens, what the caller passed (position ids, cache positions, the
length its cache object reported, the mask's length), the position ids the rotary embedding was given where
the model has one, and per decoder layer the residual stream it outputs and the attention module's output (a
layer's input is the previous layer's output: recording it too would store every residual twice).
Decoder layers are the modules transformers names in `_no_split_modules` (its own declaration of the layer
class, used for device maps); the attention module is the outermost submodule of a layer whose class name
says `Attention`.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn


@dataclass
class ForwardCall:
    """One call of the model: what it was given and what its layers produced (`[b, new, d]` each)."""

    input_ids: torch.Tensor  # [b, new]
    passed_position_ids: torch.Tensor | None
    passed_cache_position: torch.Tensor | None
    reported_cache_length: int | None  # the cache object's own answer before the call
    mask_length: int | None
    rotary_position_ids: torch.Tensor | None = None  # [b or 1, new] as the rotary embedding received them
    attention_outputs: list[torch.Tensor] = field(default_factory=list)
    layer_outputs: list[torch.Tensor] = field(default_factory=list)
    logits: torch.Tensor | None = None  # [b, kept, vocab]: the last `kept` tokens' logits

    @property
    def new_tokens(self) -> int:
        return self.input_ids.shape[1]

    def positions_used(self) -> torch.Tensor | None:
        """`[b or 1, new]` the position ids the model computed with, where they can be seen."""
        positions = self.rotary_position_ids if self.rotary_position_ids is not None else self.passed_position_ids
        return None if positions is None else positions.reshape(-1, positions.shape[-1])


def decoder_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """`(qualified name, module)` of every decoder layer, in order."""
    layer_classes = set(getattr(model, "_no_split_modules", None) or ())
    layers = [(name, module) for name, module in model.named_modules() if type(module).__name__ in layer_classes]
    expected = model.config.get_text_config().num_hidden_layers
    if len(layers) != expected:
        raise ValueError(f"{type(model).__name__}: found {len(layers)} decoder layers of the classes its "
                         f"_no_split_modules names ({sorted(layer_classes)}), its config says {expected}; "
                         "this model's layers cannot be probed")
    return layers


def attention_module(layer_name: str, layer: nn.Module) -> tuple[str, nn.Module]:
    for name, module in layer.named_modules():
        if name and "Attention" in type(module).__name__:
            return f"{layer_name}.{name}", module
    raise ValueError(f"decoder layer {layer_name} ({type(layer).__name__}) has no submodule whose class is an "
                     "Attention module")


def _first(output):
    return output[0] if isinstance(output, (tuple, list)) else output


def _reported_length(cache) -> int | None:
    if cache is None:
        return None
    if hasattr(cache, "get_seq_length"):
        return int(cache.get_seq_length())
    if isinstance(cache, (tuple, list)) and cache and isinstance(cache[0], (tuple, list)):
        return int(cache[0][0].shape[-2])  # the legacy tuple format: [b, heads, tokens, d]
    return None


class ModuleProbe:
    """`with ModuleProbe(model) as probe: ...` records `probe.calls`; every hook is removed on exit, also
    when the body raises."""

    def __init__(self, model: nn.Module):
        self.model = model
        self.layers = decoder_layers(model)
        self.attentions = [attention_module(name, layer) for name, layer in self.layers]
        self.rotary = [module for module in model.modules() if type(module).__name__.endswith("RotaryEmbedding")]
        self.calls: list[ForwardCall] = []
        self._handles = []

    @property
    def layer_names(self) -> list[str]:
        return [name for name, _ in self.layers]

    @property
    def attention_names(self) -> list[str]:
        return [name for name, _ in self.attentions]

    def __enter__(self) -> ModuleProbe:
        register = self._handles.append
        try:
            register(self.model.register_forward_pre_hook(self._before_forward, with_kwargs=True))
            register(self.model.register_forward_hook(self._after_forward))
            for _, layer in self.layers:
                register(layer.register_forward_hook(self._after_layer))
            for _, attention in self.attentions:
                register(attention.register_forward_hook(self._after_attention))
            for rotary in self.rotary:
                register(rotary.register_forward_pre_hook(self._before_rotary, with_kwargs=True))
        except BaseException:
            self.remove()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self.remove()

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    # -- hooks ------------------------------------------------------------------------------------------
    def _before_forward(self, module, args, kwargs):
        input_ids = kwargs.get("input_ids", args[0] if args else None)
        if input_ids is None:
            raise ValueError("the decode loop called the model without input_ids (inputs_embeds only): the "
                             "verifier aligns forwards by the tokens they were given")
        mask = kwargs.get("attention_mask")
        self.calls.append(ForwardCall(
            input_ids=input_ids.detach(),
            passed_position_ids=_detached(kwargs.get("position_ids")),
            passed_cache_position=_detached(kwargs.get("cache_position")),
            reported_cache_length=_reported_length(kwargs.get("past_key_values")),
            mask_length=None if mask is None else int(mask.shape[-1]),
        ))

    def _after_forward(self, module, args, output):
        logits = getattr(output, "logits", None)
        if logits is None and isinstance(output, (tuple, list)):
            logits = output[0]
        self.calls[-1].logits = None if logits is None else logits.detach()

    def _after_layer(self, module, args, output):
        self.calls[-1].layer_outputs.append(_first(output).detach())

    def _after_attention(self, module, args, output):
        self.calls[-1].attention_outputs.append(_first(output).detach())

    def _before_rotary(self, module, args, kwargs):
        position_ids = kwargs.get("position_ids", args[1] if len(args) > 1 else None)
        call = self.calls[-1] if self.calls else None
        if call is not None and call.rotary_position_ids is None and isinstance(position_ids, torch.Tensor) \
                and not position_ids.is_floating_point():
            call.rotary_position_ids = position_ids.detach()


def _detached(value):
    return value.detach() if isinstance(value, torch.Tensor) else None
