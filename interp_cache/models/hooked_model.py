"""HookedModel: a transformers causal LM with TransformerLens hook points on attention, cache and positions.

Called exactly as transformers is called. Before the wrapped model runs, a forward pre-hook opens a
`ForwardContext`: it picks the cache (the caller's `HookedCache`, a new one, or one that lives for this
forward only), fixes the true positions of the new tokens (given `position_ids`, else derived from the
cache's logical length and the attention mask) and hands those positions to the model, so rotary tables,
learned position embeddings, ALiBi and the stored entry positions all agree. After the run the context
is closed -- also when the run raises, in which case the cache writes of the failed forward are undone.
"""

from __future__ import annotations

import difflib
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from transformer_lens.HookedRootModule import HookedRootModule
from transformers.cache_utils import Cache

from interp_cache.adapters.base import BlockLayout
from interp_cache.adapters.registry import family_for
from interp_cache.adapters.runner import AttentionLayerRunner
from interp_cache.analysis.recording import record
from interp_cache.cache.hooked_cache import HookedCache
from interp_cache.cache.layer import HookedCacheLayer
from interp_cache.compress.base import check_policy
from interp_cache.compress.spec import parse_policy
from interp_cache.core.context import ForwardContext
from interp_cache.core.hook_points import (
    POSITION_IDS_LAYOUT,
    BlockHooks,
    BlockPoints,
    CachedDecodingHookPoint,
    FinalNormHooks,
    check_hook_function,
    run_hook,
    token_layout,
)
from interp_cache.decoding.generate import generate
from interp_cache.models.hook_sites import ActivationSites
from interp_cache.models.lens_habits import TransformerLensHabits


@dataclass
class OpenForward:
    """The forward now running: its context, the cache it writes, and whether that cache outlives it."""

    context: ForwardContext
    cache: HookedCache
    persistent: bool  # False when the caller asked for no cache: the cache lives for this forward only


def _embedding_width(module: nn.Module) -> int:
    return module.embedding_dim if hasattr(module, "embedding_dim") else module.weight.shape[-1]


class HookedModel(TransformerLensHabits, HookedRootModule):
    """Wraps `hf_model` in place: its attention modules' `forward` (instance attributes, the classes are
    untouched) and two forward hooks on the model route every call through the hooked pipeline, so the
    object you passed computes through interp_cache from now on. `unwrap()` gives it its own behaviour back.
    """

    def __init__(self, hf_model: nn.Module, tokenizer=None):
        super().__init__()
        family = family_for(hf_model.config)
        self.family = family.name
        self.adapter = adapter = family.adapter.bind(hf_model)
        self.hf_model = hf_model
        self.tokenizer = tokenizer
        self._open: OpenForward | None = None
        self._unwrapped = False

        layers = adapter.decoder_layers(hf_model)
        modules = [adapter.attention_module(layer) for layer in layers]
        specs = [adapter.attention_spec(hf_model, i, module) for i, module in enumerate(modules)]
        layout = adapter.block_layout(hf_model.config)
        self.block_layout = layout
        hidden = hf_model.config.hidden_size
        projections = [adapter.qkv_projections(i) if adapter.keeps_module_forward else None for i in range(len(layers))]
        embedding = adapter.token_embedding(hf_model)
        self.hook_embed = CachedDecodingHookPoint(token_layout(_embedding_width(embedding)))
        if adapter.learned_positions:
            position_embedding = adapter.position_embedding(hf_model)
            self.hook_pos_embed = CachedDecodingHookPoint(token_layout(_embedding_width(position_embedding)))
        self.hook_position_ids = CachedDecodingHookPoint(POSITION_IDS_LAYOUT)
        self.blocks = nn.ModuleList(
            BlockHooks(i, spec.head_dims, hidden, BlockPoints(
                rotary=adapter.rotary, alibi=adapter.alibi,
                projections=not adapter.keeps_module_forward or projections[i] is not None,
                mlp_out=layout.mlp_out is not None, resid_mid=layout.resid_mid is not None))
            for i, spec in enumerate(specs)
        )
        final_norm = BlockLayout.resolve(hf_model, layout.final_norm)
        if final_norm is not None:
            self.ln_final = FinalNormHooks(hidden)
        self._accepts_position_ids = adapter.accepts_position_ids(hf_model)
        self.runners: list[AttentionLayerRunner] = []
        self._sites = sites = ActivationSites(lambda: None if self._open is None else self._open.context)
        self._undo = []
        for i, (layer, module, spec) in enumerate(zip(layers, modules, specs)):
            runner = AttentionLayerRunner(adapter, module, i, spec, self.blocks[i], self._layer_forward)
            self._undo.append(adapter.install(module, runner))
            self.runners.append(runner)
            block = self.blocks[i]
            sites.input(block.hook_resid_pre, layer)
            for point_name, projection, first, end in projections[i] or ():
                sites.projection(getattr(block.attn, point_name), projection, first, end)
            if adapter.keeps_module_forward:
                sites.output(block.hook_attn_out, module)
            if layout.resid_mid is not None:
                sites.shared_input(block.hook_resid_mid, BlockLayout.resolve(layer, layout.resid_mid))
            if layout.mlp_out is not None:
                sites.output(block.hook_mlp_out, BlockLayout.resolve(layer, layout.mlp_out),
                             edited_in_place_after=layout.mlp_out_added_to_in_place)
            sites.output(block.hook_resid_post, layer)
        sites.output(self.hook_embed, embedding)
        if adapter.learned_positions:
            sites.output(self.hook_pos_embed, position_embedding)
        if final_norm is not None:
            sites.output(self.ln_final.hook_normalized, final_norm)
        self._undo.append(adapter.switch_on(hf_model))
        self._context_handles = [
            hf_model.register_forward_pre_hook(self._open_context, with_kwargs=True),
            hf_model.register_forward_hook(self._close_context, always_call=True),
        ]
        self.setup()

    def setup(self):
        # Only our hook points get names; the wrapped transformers modules are left as they are.
        self.mod_dict, self.hook_dict = {}, {}
        for name, module in self.named_modules():
            if isinstance(module, CachedDecodingHookPoint):
                module.name = name
                self.mod_dict[name] = module
                self.hook_dict[name] = module

    # -- the transformers calling convention ---------------------------------------------------------
    @property
    def config(self):
        return self.hf_model.config

    @property
    def device(self) -> torch.device:
        """Where inputs go: the token embedding's device (the CPU where accelerate offloaded it)."""
        device = self.hf_model.get_input_embeddings().weight.device
        return torch.device("cpu") if device.type == "meta" else device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.hf_model.parameters()).dtype

    @property
    def num_layers(self) -> int:
        return len(self.blocks)

    @property
    def check_hook_outputs(self) -> bool:
        """Whether a hook that returns NaN (or +-inf where its layout gives it no meaning) stops the run with
        `NonFiniteHookOutput` naming the hook, step and position (default True; False saves one pass over
        each hooked activation)."""
        return all(point.check_outputs for point in self.hook_dict.values())

    @check_hook_outputs.setter
    def check_hook_outputs(self, value: bool) -> None:
        if not isinstance(value, bool):
            raise TypeError(f"check_hook_outputs is True or False; got {type(value).__name__}")
        for point in self.hook_dict.values():
            point.check_outputs = value

    def new_cache(self, compress=None) -> HookedCache:
        """An empty cache; `compress` is a policy from `interp_cache.compress`, or its spec string as on the
        command line (`"snapkv:budget=64,window=8"`); None keeps every entry."""
        if isinstance(compress, str):
            compress = parse_policy(compress)
        if compress is not None:
            check_policy(compress, self)
        return HookedCache(self.num_layers, compress)

    def forward(
        self,
        input_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        past_key_values: HookedCache | None = None,
        use_cache: bool = False,
        return_type: str | None = "output",
        **kwargs: Any,
    ):
        """`input_ids` may be text (a string or list of strings, tokenized left-padded); `return_type`:
        "output" (transformers' output object), or TransformerLens' "logits", "loss", "both", None."""
        self._require_wrapped()
        input_ids, attention_mask = self._encode_text(input_ids, attention_mask)
        if position_ids is not None:
            kwargs["position_ids"] = position_ids
        output = self.hf_model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            past_key_values=past_key_values,
            use_cache=use_cache,
            **kwargs,
        )
        return self._shaped_output(output, input_ids, attention_mask, return_type)

    def generate(self, input_ids: torch.Tensor | str | list[str], attention_mask: torch.Tensor | None = None,
                 **kwargs: Any):
        """transformers' `generate` over a HookedCache; `compress=policy` compresses it (`interp_cache.decoding`).
        Text in, text out (prompt and continuation, as TransformerLens returns it)."""
        self._require_wrapped()
        ids, mask = self._encode_text(input_ids, attention_mask)
        out = generate(self, ids, attention_mask=mask, **kwargs)
        if ids is input_ids or not isinstance(out, torch.Tensor):
            return out
        texts = self.tokenizer.batch_decode(out, skip_special_tokens=True)
        return texts[0] if isinstance(input_ids, str) else texts

    # TransformerLens' two ways in (`add_hook`, and `hooks()` / `run_with_hooks` through `_enable_hook`), with
    # an unknown name listing the close matches and a function that cannot be called as
    # `fn(activation, hook=point)` refused before anything runs.
    def add_hook(self, name, hook, dir="fwd", is_permanent=False, level=None, prepend=False) -> None:
        self._check_hook(name, hook)
        super().add_hook(name, hook, dir=dir, is_permanent=is_permanent, level=level, prepend=prepend)

    def _enable_hook(self, name, hook, dir) -> None:
        self._check_hook(name, hook)
        super()._enable_hook(name, hook, dir)

    def _check_hook(self, name, hook) -> None:
        if isinstance(name, str):
            self.hook_point(name)
        elif not callable(name):
            raise TypeError(f"a hook is attached by name (str) or by a filter fn(name) -> bool; got {type(name).__name__}")
        check_hook_function(hook)

    def hook_point(self, name: str) -> CachedDecodingHookPoint:
        """The hook point called `name`; an unknown name is an error that lists the close matches."""
        if not isinstance(name, str):
            raise TypeError(f"a hook point name is a string like 'blocks.0.attn.hook_z'; got {type(name).__name__}")
        point = self.hook_dict.get(name)
        if point is None:
            close = difflib.get_close_matches(name, list(self.hook_dict), n=5, cutoff=0.6)
            suggestion = f"close matches: {', '.join(close)}" if close else (
                f"names are e.g. {', '.join(list(self.hook_dict)[:4])}, ...")
            raise ValueError(
                f"no hook point named {name!r} in this {self.family} model; {suggestion} (model.hook_dict lists them all)"
            )
        return point

    def unwrap(self) -> nn.Module:
        """Give the wrapped transformers model its own behaviour back and return it (this wrapper then refuses
        to run): its attention modules' original `forward`, no hooks of ours on it."""
        for undo in self._undo:
            undo()
        for handle in self._context_handles:
            handle.remove()
        self._sites.remove_all()
        self._context_handles, self._undo = [], []
        self._unwrapped = True
        return self.hf_model

    def _require_wrapped(self) -> None:
        if self._unwrapped:
            raise RuntimeError("this HookedModel was unwrapped; wrap the model again: HookedModel(hf_model, tokenizer)")

    def set_explicit_attention(self, explicit: bool) -> None:
        """Force every layer onto the explicit (score-materialising) path, e.g. to compare the two paths."""
        for runner in self.runners:
            runner.force_explicit = explicit

    # -- the forward context -------------------------------------------------------------------------
    @property
    def context(self) -> ForwardContext | None:
        """The context of the forward now running (None between forwards)."""
        return None if self._open is None else self._open.context

    def _layer_forward(self, layer_idx: int) -> tuple[ForwardContext, HookedCacheLayer]:
        if self._open is None:
            raise RuntimeError("hooked attention ran outside a HookedModel forward (no context is open)")
        return self._open.context, self._open.cache.layers[layer_idx]

    def _open_context(self, module, args, kwargs):
        if args:
            kwargs = {**dict(zip(("input_ids", "attention_mask"), args)), **kwargs}
            args = ()
        input_ids, inputs_embeds = kwargs.get("input_ids"), kwargs.get("inputs_embeds")
        reference = input_ids if input_ids is not None else inputs_embeds
        if reference is None:
            raise ValueError("the model needs input_ids or inputs_embeds")
        b, p = reference.shape[:2]
        if p == 0:
            raise ValueError("empty input: input_ids has 0 tokens; pass at least one token per row")

        cache, persistent = self._choose_cache(kwargs, b)
        new_is_padding = self._new_padding(kwargs.get("attention_mask"), cache, b, p, reference.device)

        position_ids = kwargs.get("position_ids")
        if position_ids is None:
            positions = cache.derive_positions(new_is_padding)
        else:
            if position_ids.ndim != 2 or position_ids.shape[-1] != p or position_ids.shape[0] not in (1, b):
                raise ValueError(f"position_ids must have shape [{b}, {p}] (or [1, {p}]); got {tuple(position_ids.shape)}")
            positions = position_ids.expand(b, p).long()
        has_padding = kwargs.get("attention_mask") is not None and bool(new_is_padding.any())
        context = ForwardContext(cache.forward_count, positions, new_is_padding, has_padding)
        context.positions = run_hook(self.hook_position_ids, positions, context)
        if self._accepts_position_ids:
            kwargs["position_ids"] = context.positions
        self._sites.sync()
        cache.begin_forward()
        cache.written_in_attention = self.adapter.keeps_module_forward
        self._open = OpenForward(context, cache, persistent)
        return args, kwargs

    def _choose_cache(self, kwargs: dict, batch_size: int) -> tuple[HookedCache, bool]:
        past = kwargs.get("past_key_values")
        use_cache = kwargs.get("use_cache")
        if use_cache is None:
            use_cache = getattr(self.config, "use_cache", True)
        if isinstance(past, HookedCache):
            if len(past.layers) != self.num_layers:
                raise ValueError(f"the HookedCache has {len(past.layers)} layers; this model has {self.num_layers}")
            return past, True
        if past is None or (isinstance(past, Cache) and past.get_seq_length() == 0):
            cache = self.new_cache()
            if use_cache:
                kwargs["past_key_values"] = cache
            elif past is not None:
                kwargs["past_key_values"] = None
            return cache, bool(use_cache)
        raise TypeError(
            f"past_key_values must be a HookedCache (from model.new_cache() or a previous output), got "
            f"{type(past).__name__}; a cache filled by an unhooked model does not know its entries' positions"
        )

    def _new_padding(self, attention_mask, cache: HookedCache, b: int, p: int, device) -> torch.Tensor:
        if attention_mask is None:
            return torch.zeros(b, p, dtype=torch.bool, device=device)
        if not isinstance(attention_mask, torch.Tensor) or attention_mask.ndim != 2:
            raise ValueError(
                "attention_mask must be a 2D [batch, past + new tokens] tensor of 0/1 (a 4D or dict mask is not "
                "accepted: interp_cache builds masks from true positions)"
            )
        expected = cache.logical_length + p
        if attention_mask.shape != (b, expected):
            raise ValueError(
                f"attention_mask has shape {tuple(attention_mask.shape)}; expected ({b}, {expected}) = "
                f"(batch, {cache.logical_length} cached + {p} new token slots)"
            )
        return attention_mask[:, -p:] == 0

    def _close_context(self, module, args, output):
        opened, self._open = self._open, None
        if opened is None:
            return output
        opened.cache.written_in_attention = False
        if output is None:  # the forward raised: undo its cache writes
            opened.cache.rollback()
            return output
        opened.cache.end_forward(opened.context)
        if not opened.persistent and getattr(output, "past_key_values", None) is not None:
            output.past_key_values = None
        return output

    def record(self, names_filter=None, device="cpu", dtype=None):
        """`with model.record(names) as rec: ...`: every hook call's activation with its step and positions."""
        return record(self, names_filter, device=device, dtype=dtype)
