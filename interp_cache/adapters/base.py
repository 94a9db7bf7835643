"""What a family is: an adapter that knows the family's attention, and the zoo model that exercises it.

An adapter knows where a family keeps its layers, embeddings and attention weights, and how it forms
q, k, v and the output projection. Everything after the projections -- hooks, rotary, the cache write
and read, the attention core -- is `AttentionLayerRunner` (`runner.py`), shared by all families.

A module of this package declares its families in a module-level `FAMILIES` list of `Family` objects:
the adapter, the transformers `model_type` it serves and the tiny zoo config beside it. The registry
(`registry.py`) reads those lists; adding a family is one file.

Adapters replace `forward` on the *instances* of the wrapped model's attention modules (never on their
classes), so a second, unwrapped model of the same family in the process still computes the original.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from interp_cache.core.attention import AttentionSpec

LayerRunner = Callable[[torch.Tensor, dict[str, Any]], torch.Tensor]  # hidden states, call kwargs -> attention out


class FamilyAdapter:
    family: str = ""
    rotary: bool = False
    alibi: bool = False
    learned_positions: bool = False

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

    def make_forward(self, module: nn.Module, runner: LayerRunner) -> Callable:
        """The replacement `forward`: accept the family's call signature, return what its layer expects."""
        raise NotImplementedError

    # -- how the wrapping is put on and taken off -----------------------------------------------------
    def bind(self, hf_model: nn.Module) -> FamilyAdapter:
        """The adapter for this model instance (the generic path reads facts off the model it wraps)."""
        return self

    def install(self, module: nn.Module, runner: LayerRunner) -> Callable[[], None]:
        """Route `module`'s attention through `runner`; return what undoes it.

        An instance attribute, so the class is untouched. Where accelerate dispatched the model with a hook on
        this very module, its `forward` is accelerate's wrapper (moving inputs, loading offloaded weights) and
        the module's own forward is `_old_forward`: that is the one replaced, so the wrapper still runs.
        """
        attribute = "_old_forward" if "_old_forward" in module.__dict__ and hasattr(module, "_hf_hook") else "forward"
        previous = module.__dict__.get(attribute)
        setattr(module, attribute, self.make_forward(module, runner))

        def undo():
            if previous is None:
                module.__dict__.pop(attribute, None)
            else:
                setattr(module, attribute, previous)

        return undo

    def switch_on(self, hf_model: nn.Module) -> Callable[[], None]:
        """Model-wide changes the wrapping needs (none for an adapter that replaces `forward`); return the undo."""
        return lambda: None

    # False: `install` replaces the module's forward, and the runner fires hook_q/k/v and hook_attn_out. True (the
    # generic path): the module runs its own forward, so those points are read off its submodules, and the
    # cache's `update` it calls is a no-op while the core writes the entries.
    keeps_module_forward = False

    # -- the rest of the block: hook_mlp_out, hook_resid_mid, ln_final.hook_normalized ----------------
    def block_layout(self, config) -> BlockLayout:
        raise NotImplementedError


@dataclass(frozen=True)
class BlockLayout:
    """Where a decoder block's MLP and residual stream are read, as attribute paths (None: the point is absent).

    `mlp_out`: relative to a decoder layer, the module whose output is the MLP's contribution to the
    residual stream (after a post-MLP norm where the family has one). `resid_mid`: the module whose first
    input is the residual stream between attention and MLP -- the very tensor the block later adds the
    MLP's contribution to, which is what lets a patch there reach both (absent in blocks that add
    attention and MLP to the residual in parallel). `final_norm`: relative to the model, the norm before
    the unembedding. `absent`: why a point is None, said when someone asks for it.
    """

    mlp_out: str | None
    resid_mid: str | None
    final_norm: str | None
    absent: str = ""
    mlp_out_added_to_in_place: bool = False  # the block adds attention into the MLP's output tensor (Falcon)

    @staticmethod
    def resolve(root: nn.Module, path: str | None) -> nn.Module | None:
        return None if path is None else root.get_submodule(path)


PARALLEL_BLOCK = "attention and MLP read the same input and are added to the residual stream together (parallel block)"


@dataclass(frozen=True)
class ZooShape:
    """The size of a zoo model and the token ids of the tokenizer it is built for (`interp_cache.models.zoo`)."""

    hidden: int
    layers: int
    heads: int
    max_positions: int
    init_range: float
    vocab_size: int
    pad_token_id: int
    bos_token_id: int
    eos_token_id: int

    def standard_fields(self) -> dict:
        """The size fields under the names most transformers configs use (Llama, GPT-NeoX, Phi, ...)."""
        return dict(
            hidden_size=self.hidden, num_hidden_layers=self.layers, num_attention_heads=self.heads,
            intermediate_size=2 * self.hidden, max_position_embeddings=self.max_positions,
            initializer_range=self.init_range, tie_word_embeddings=False,
        )

    def build(self, config_class, overrides: dict, **fields):
        """`config_class` with the tokenizer's ids and a family's `fields`, `overrides` winning over both."""
        ids = dict(vocab_size=self.vocab_size, pad_token_id=self.pad_token_id, bos_token_id=self.bos_token_id,
                   eos_token_id=self.eos_token_id)
        return config_class(**{**ids, **fields, **overrides})


@dataclass(frozen=True)
class Family:
    """One supported family: its adapter, the configs it serves, and its zoo model."""

    name: str
    adapter: FamilyAdapter
    model_type: str  # transformers' config.model_type
    zoo_config: Callable[..., Any]  # zoo_config(shape: ZooShape, **overrides) -> a transformers config
    description: str  # what the zoo model exercises, for `interp-cache zoo`
    config_flag: tuple[str, bool] | None = None  # (attribute, value) when two families share a model_type

    def serves(self, config) -> bool:
        if getattr(config, "model_type", None) != self.model_type:
            return False
        if self.config_flag is None:
            return True
        attribute, value = self.config_flag
        return bool(getattr(config, attribute, False)) == value
