"""Editing a cache between steps: read, replace and delete entries by absolute position; fork; rewind.

A mixin of `HookedCache`: it works on the cache's layers through their read / overwrite / retain /
crop, so every edit goes through the same storage operations as compression, and a policy's state
(Quest's page bounds) follows the edited entries.
"""

from __future__ import annotations

import copy

import torch

from interp_cache.cache.ragged import keep_from_mask
from interp_cache.cache.storage import Arrangement


class CacheEditing:
    def _entry_selection(self, layer_idx: int, positions, heads, rows) -> tuple[torch.Tensor, torch.Tensor]:
        """`[b, g, k]` mask of the stored entries at absolute `positions` (all real ones if None) of the chosen
        KV heads and batch rows, and the positions read."""
        if not 0 <= layer_idx < len(self.layers):
            raise ValueError(f"layer must be in [0, {len(self.layers)}); got {layer_idx}")
        layer = self.layers[layer_idx]
        if not layer.is_initialized:
            raise ValueError(f"layer {layer_idx} holds no entries yet: run a forward on this cache first")
        stored = layer.read()[2]
        b, g, _ = stored.shape
        chosen = stored >= 0
        if positions is not None:
            wanted = torch.as_tensor(list(positions) if not isinstance(positions, torch.Tensor) else positions,
                                     dtype=torch.long, device=stored.device).reshape(-1)
            chosen &= (stored[..., None] == wanted).any(-1)
        for name, index, size, axis in (("heads", heads, g, 1), ("rows", rows, b, 0)):
            if index is None:
                continue
            index = [index] if isinstance(index, int) else list(index)
            if any(not 0 <= i < size for i in index):
                raise ValueError(f"{name} must be in [0, {size}); got {index}")
            keep = torch.zeros(size, dtype=torch.bool, device=stored.device)
            keep[index] = True
            chosen &= keep.view([-1 if a == axis else 1 for a in range(3)])
        return chosen, stored

    def read_entries(self, layer_idx: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Copies of layer `layer_idx`'s keys, values `[b, g, k, d]` and true positions `[b, g, k]` (-1: none)."""
        return tuple(t.clone() for t in self.layers[layer_idx].read())

    def replace_entries(
        self,
        layer_idx: int,
        positions=None,
        keys: torch.Tensor | None = None,
        values: torch.Tensor | None = None,
        new_positions: int | torch.Tensor | None = None,
        heads=None,
        rows=None,
    ) -> int:
        """Overwrite the key/value (and/or the stored position) of the entries at absolute `positions`.

        `keys` / `values` are either full `[b, g, k, d]` tensors aligned with `read_entries` (their selected
        entries are copied in) or a `[d]` vector written into every selected entry. Keys are stored after
        rotary: a replacement key must be rotated for the position it represents. Returns the entries changed.
        """
        chosen, stored = self._entry_selection(layer_idx, positions, heads, rows)
        if not bool(chosen.any()):
            raise ValueError(f"no stored entry of layer {layer_idx} matches positions={positions!r}")
        layer = self.layers[layer_idx]
        current_keys, current_values, current_positions = (t.clone() for t in layer.read())
        for name, current, new in (("keys", current_keys, keys), ("values", current_values, values)):
            if new is None:
                continue
            new = new.to(current.dtype)
            if new.shape == current.shape:
                current[chosen] = new[chosen]
            elif new.shape == current.shape[-1:]:
                current[chosen] = new
            else:
                raise ValueError(
                    f"{name} must have shape {tuple(current.shape)} (aligned with read_entries) or "
                    f"{tuple(current.shape[-1:])}; got {tuple(new.shape)}"
                )
        if new_positions is not None:
            new_positions = torch.as_tensor(new_positions, dtype=torch.long, device=stored.device)
            current_positions = torch.where(chosen, new_positions.expand_as(stored), current_positions)
        layer.overwrite(current_keys, current_values, current_positions)
        return int(chosen.sum())

    def delete_entries(self, layer_idx: int, positions, heads=None, rows=None) -> int:
        """Remove the entries at absolute `positions` (of the chosen KV heads and rows); returns how many."""
        chosen, _ = self._entry_selection(layer_idx, positions, heads, rows)
        self.layers[layer_idx].retain(keep_from_mask(~chosen))
        return int(chosen.sum())

    def fork(self):
        """An independent copy: continuations from the fork never touch this cache.

        Tensors are cloned (not deep-copied), so a cache filled with gradients enabled forks too -- and the
        fork's entries stay differentiable with respect to what produced them.
        """
        clones: dict[int, object] = {}
        seen: set[int] = set()

        def clone_tensors_in(value) -> None:
            if id(value) in seen:
                return
            seen.add(id(value))
            if isinstance(value, torch.Tensor):
                clones[id(value)] = value.clone()
            elif isinstance(value, dict):
                for item in value.values():
                    clone_tensors_in(item)
            elif isinstance(value, (list, tuple)):
                for item in value:
                    clone_tensors_in(item)
            elif hasattr(value, "__dict__") and not isinstance(value, type):
                for item in vars(value).values():
                    clone_tensors_in(item)

        clone_tensors_in(self)
        return copy.deepcopy(self, clones)

    def rewind(self, num_tokens: int) -> None:
        """Forget the last `num_tokens` token slots (decode steps), e.g. to try another continuation."""
        if num_tokens < 0 or num_tokens > self.logical_length:
            raise ValueError(f"rewind needs 0 <= num_tokens <= {self.logical_length}; got {num_tokens}")
        if num_tokens == 0:
            return
        evicted = [layer.layer_idx for layer in self.layers if layer.storage.arrangement is not Arrangement.ALIGNED]
        if evicted:
            raise ValueError(
                f"cannot rewind: compression evicted entries in layers {evicted}, so the last token slots are no "
                "longer all stored; fork() the cache before the step you want to return to"
            )
        for layer in self.layers:
            layer.crop(-num_tokens)
        stored = self.layers[0].read()[2][:, 0]
        if stored.shape[-1] == 0:
            self.next_position = None
        else:
            self.next_position = (stored.max(dim=-1).values + 1).clamp(min=0)
        remaining = num_tokens
        while remaining:
            last = self.slots_per_forward.pop()
            if last > remaining:  # rewinding into the middle of a forward: it stays, shorter
                self.slots_per_forward.append(last - remaining)
                break
            remaining -= last
            self.forward_count -= 1

