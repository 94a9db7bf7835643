"""The generic path: any decoder whose attention calls transformers' attention interface.

Such a module projects q, k, v, applies its own q/k norms and positional encoding, and hands the result
to `ALL_ATTENTION_FUNCTIONS[config._attn_implementation]`. Wrapping registers `interp_cache` there and
switches the model to it, so the module runs its own forward -- its projections, norms and rotary
(longrope, YaRN, local/global bases: whatever the family does, exactly) -- and our function takes over
from the encoded q and k: `hook_rot_q` / `hook_rot_k`, the position-true cache write and read, the
attention core with its score / pattern / z hooks. The module then applies its own output projection.

Facts are read off the model, not guessed from names. A probe forward of two tokens at wrap time records
which module each call comes from (that gives the decoder layers and their attention modules) and the
arguments it passes (scaling, sliding window, softcap: the layer's `AttentionSpec`); every later call is
checked against them. What the path cannot reproduce is refused: a layer that does not call the
interface (linear attention, Mamba blocks), non-causal attention, value heads of another width, attention
sinks or any other argument it does not know.

What a generic family lacks: `hook_q` / `hook_k` / `hook_v` exist where the module has `q_proj`,
`k_proj`, `v_proj` linear layers (or a fused projection its family declares) and are their outputs --
before a q/k norm, which the module applies itself; the MLP and `resid_mid` points exist where the family
declares its block layout (`interface_families.py`). The cache is handed to the module as transformers
expects, but its `update` is a no-op on this path (`HookedCache.update`): the write happens in the core,
where each entry's true position is known.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn
from transformers import AttentionInterface, AutoModelForCausalLM

from interp_cache.adapters.base import BlockLayout, FamilyAdapter, LayerRunner
from interp_cache.core.attention import AttentionSpec

INTERFACE_NAME = "interp_cache"
_PROBE_NAME = "interp_cache_probe"
_BINDING = "_interp_cache_binding"  # instance attribute of a wrapped attention module

# Keyword arguments a module passes along from its caller that do not change what attention computes.
_CALLER_CONTEXT = frozenset({"position_ids", "use_cache", "cache_position", "output_attentions", "return_dict"})


class InterfaceRefused(ValueError):
    """The model's attention does something the generic path cannot reproduce exactly."""


@dataclass(frozen=True)
class InterfaceCall:
    """What one layer's module passes to the attention interface (recorded by the probe)."""

    module: nn.Module
    num_heads: int
    num_kv_heads: int
    head_dim: int
    scaling: float
    sliding_window: int | None
    softcap: float | None

    def spec(self) -> AttentionSpec:
        return AttentionSpec(self.num_heads, self.num_kv_heads, self.head_dim, self.scaling,
                             softcap=self.softcap, sliding_window=self.sliding_window)


def supports_interface(config) -> bool:
    """Whether transformers' causal-LM class for `config` routes attention through the interface (read
    before any weight loads: the class declares it)."""
    try:
        model_class = AutoModelForCausalLM._model_mapping[type(config)]
    except (KeyError, ValueError):
        return False
    return bool(getattr(model_class, "_supports_attention_backend", False))


def _call_arguments(module: nn.Module, query, key, value, dropout, scaling, sliding_window, softcap, kwargs):
    """The call's facts, or InterfaceRefused naming what the generic path cannot reproduce."""
    where = f"{type(module).__name__} (layer {getattr(module, 'layer_idx', '?')})"
    unknown = {name: v for name, v in kwargs.items() if name not in _CALLER_CONTEXT and v is not None and v is not False}
    if unknown:
        raise InterfaceRefused(f"{where} passes {sorted(unknown)} to the attention interface; the generic path "
                               f"reproduces scaling, sliding_window and softcap only")
    if dropout:
        raise InterfaceRefused(f"{where} applies attention dropout {dropout} (training mode?); call model.eval()")
    if getattr(module, "is_causal", True) is not True:
        raise InterfaceRefused(f"{where} attends bidirectionally (is_causal=False); only causal decoders are served")
    if value.shape[-1] != query.shape[-1] or key.shape[-1] != query.shape[-1]:
        raise InterfaceRefused(f"{where}: q, k, v head widths {query.shape[-1]}, {key.shape[-1]}, {value.shape[-1]} "
                               "differ; the attention core needs one head width")
    head_dim = query.shape[-1]
    return InterfaceCall(module, query.shape[1], key.shape[1], head_dim,
                         float(head_dim**-0.5 if scaling is None else scaling), sliding_window, softcap)


def _probe(module, query, key, value, attention_mask, dropout=0.0, scaling=None, sliding_window=None,
           softcap=None, **kwargs):
    _PROBED.append(_call_arguments(module, query, key, value, dropout, scaling, sliding_window, softcap, kwargs))
    b, _, p, d = query.shape
    return query.new_zeros(b, p, query.shape[1], d), None


def _interface_attention(module, query, key, value, attention_mask, dropout=0.0, scaling=None, sliding_window=None,
                         softcap=None, **kwargs):
    binding = module.__dict__.get(_BINDING)
    if binding is None:
        raise RuntimeError(f"attn_implementation {INTERFACE_NAME!r} computes attention inside a HookedModel only; "
                           f"{type(module).__name__} is not wrapped (set another attn_implementation)")
    expected, runner = binding
    if (dropout or scaling != expected.scaling or sliding_window != expected.sliding_window
            or softcap != expected.softcap or kwargs.keys() - _CALLER_CONTEXT):
        call = _call_arguments(module, query, key, value, dropout, scaling, sliding_window, softcap, kwargs)
        if call != expected:
            raise InterfaceRefused(f"{type(module).__name__} called attention with {call}; at wrap time it passed "
                                   f"{expected} (the layer's AttentionSpec), so this call cannot be served as declared")
    # contiguous as transformers' own attention functions return it: some modules `.view` the output
    return runner.attend_rotated(query, key, value).contiguous(), None


_PROBED: list[InterfaceCall] = []
AttentionInterface.register(INTERFACE_NAME, _interface_attention)
AttentionInterface.register(_PROBE_NAME, _probe)


def probe_attention_calls(hf_model: nn.Module) -> list[InterfaceCall]:
    """Run two tokens through `hf_model` with a recording attention function; one call per layer, in order."""
    previous = hf_model.config._attn_implementation
    embedding = hf_model.get_input_embeddings().weight
    device = torch.device("cpu") if embedding.device.type == "meta" else embedding.device
    _PROBED.clear()
    hf_model.set_attn_implementation(_PROBE_NAME)
    try:
        with torch.no_grad():
            hf_model(input_ids=torch.zeros(1, 2, dtype=torch.long, device=device), use_cache=False)
        return list(_PROBED)
    finally:
        hf_model.set_attn_implementation(previous)
        _PROBED.clear()


def _layers_holding(hf_model: nn.Module, attention_modules: list[nn.Module]) -> list[nn.Module]:
    """The decoder layers: the ModuleList whose i-th element holds the i-th probed attention module."""
    for candidate in hf_model.modules():
        if isinstance(candidate, nn.ModuleList) and len(candidate) == len(attention_modules):
            if all(any(m is attention for m in layer.modules()) for layer, attention in zip(candidate, attention_modules)):
                return list(candidate)
    raise InterfaceRefused(f"{type(hf_model).__name__}: found no list of decoder layers holding the "
                           f"{len(attention_modules)} attention modules that call the interface, one per layer")


class AttentionInterfaceAdapter(FamilyAdapter):
    """A family served by the generic path. `bind(hf_model)` probes the model and gives a `BoundInterfaceAdapter`."""

    keeps_module_forward = True

    def __init__(self, family: str, layout: BlockLayout | None = None, fused_qkv: str | None = None):
        self.family = family
        self.layout = layout  # None: an undeclared family, without MLP / resid_mid / final-norm points
        self.fused_qkv = fused_qkv  # the attribute of a q|k|v fused projection (Phi-3: qkv_proj)

    def bind(self, hf_model: nn.Module) -> BoundInterfaceAdapter:
        calls = probe_attention_calls(hf_model)
        num_layers = hf_model.config.num_hidden_layers
        if len(calls) != num_layers:
            raise InterfaceRefused(
                f"{self.family}: {len(calls)} attention-interface calls for {num_layers} layers; a layer that "
                "computes attention its own way (linear attention, a recurrent block) cannot be hooked here")
        return BoundInterfaceAdapter(self, calls, _layers_holding(hf_model, [c.module for c in calls]))


class BoundInterfaceAdapter(AttentionInterfaceAdapter):
    """The generic adapter for one model instance: its probed calls and decoder layers."""

    def __init__(self, family: AttentionInterfaceAdapter, calls: list[InterfaceCall], layers: list[nn.Module]):
        super().__init__(family.family, family.layout, family.fused_qkv)
        self.calls, self.layers = calls, layers
        self.rotary = True  # q and k arrive encoded; hook_rot_q / hook_rot_k are what attention reads

    def bind(self, hf_model):
        raise RuntimeError("this adapter is already bound to a model")

    def decoder_layers(self, hf_model):
        return self.layers

    def attention_module(self, layer):
        return next(call.module for call, bound in zip(self.calls, self.layers) if bound is layer)

    def token_embedding(self, hf_model):
        return hf_model.get_input_embeddings()

    def attention_spec(self, hf_model, layer_idx, module) -> AttentionSpec:
        return self.calls[layer_idx].spec()

    def block_layout(self, config) -> BlockLayout:
        undeclared = f"{self.family} declares no block layout (adapters/interface_families.py)"
        return self.layout or BlockLayout(None, None, None, undeclared)

    def qkv_projections(self, layer_idx: int) -> list[tuple[str, nn.Module, int, int]] | None:
        """(point name, projection, first channel, end channel) for hook_q / hook_k / hook_v; None: absent."""
        call = self.calls[layer_idx]
        widths = (call.num_heads * call.head_dim, call.num_kv_heads * call.head_dim, call.num_kv_heads * call.head_dim)
        names = ("hook_q", "hook_k", "hook_v")
        module = call.module
        if self.fused_qkv is not None:
            fused = getattr(module, self.fused_qkv)
            bounds = [0, widths[0], widths[0] + widths[1], sum(widths)]
            return [(name, fused, bounds[i], bounds[i + 1]) for i, name in enumerate(names)]
        projections = [getattr(module, attribute, None) for attribute in ("q_proj", "k_proj", "v_proj")]
        if not all(isinstance(p, nn.Linear) and p.out_features == w for p, w in zip(projections, widths)):
            return None
        return [(name, projection, 0, width) for name, projection, width in zip(names, projections, widths)]

    def install(self, module: nn.Module, runner: LayerRunner) -> Callable[[], None]:
        module.__dict__[_BINDING] = (self.calls[runner.layer_idx], runner)
        return lambda: module.__dict__.pop(_BINDING, None)

    def switch_on(self, hf_model: nn.Module) -> Callable[[], None]:
        previous = hf_model.config._attn_implementation
        hf_model.set_attn_implementation(INTERFACE_NAME)
        return lambda: hf_model.set_attn_implementation(previous)
