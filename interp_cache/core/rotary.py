"""Rotary position embeddings in the two layouts families use, applied to `[b, p, heads, d]` tensors.

`cos`/`sin` are the `[b, p, rotary_dims]` tables the wrapped model's own rotary module computed from
the true position ids (the hooked model passes them in), so frequencies, scaling variants and dtype
match the original exactly. Only the first `rotary_dims` channels rotate (partial rotary: GPT-NeoX,
Phi, GPT-J); the rest pass through.
"""

from __future__ import annotations

import torch


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    first, second = x.chunk(2, dim=-1)
    return torch.cat((-second, first), dim=-1)


def apply_half_split_rotary(x_bphd: torch.Tensor, cos_bpr: torch.Tensor, sin_bpr: torch.Tensor) -> torch.Tensor:
    """Llama/NeoX layout: channel i pairs with channel i + rotary_dims/2."""
    rotary_dims = cos_bpr.shape[-1]
    cos, sin = cos_bpr[:, :, None, :], sin_bpr[:, :, None, :]
    if rotary_dims == x_bphd.shape[-1]:
        return (x_bphd * cos) + (_rotate_half(x_bphd) * sin)
    rot, rest = x_bphd[..., :rotary_dims], x_bphd[..., rotary_dims:]
    return torch.cat(((rot * cos) + (_rotate_half(rot) * sin), rest), dim=-1)


def _rotate_every_two(x: torch.Tensor) -> torch.Tensor:
    even, odd = x[..., ::2], x[..., 1::2]
    return torch.stack((-odd, even), dim=-1).flatten(-2)


def apply_interleaved_rotary(x_bphd: torch.Tensor, cos_bpr: torch.Tensor, sin_bpr: torch.Tensor) -> torch.Tensor:
    """GPT-J layout: channel 2i pairs with channel 2i+1; `cos`/`sin` already repeated per pair."""
    rotary_dims = cos_bpr.shape[-1]
    cos, sin = cos_bpr[:, :, None, :], sin_bpr[:, :, None, :]
    rot, rest = x_bphd[..., :rotary_dims], x_bphd[..., rotary_dims:]
    rotated = (rot * cos) + (_rotate_every_two(rot) * sin)
    if rest.shape[-1] == 0:
        return rotated
    return torch.cat((rotated, rest), dim=-1)
