"""Quest (Tang et al., 2024): query-aware page selection. Nothing is evicted; each decode step reads only
the pages whose keys can score highest for its query.

The cache is cut into pages of `page_size` consecutive entries. As entries are written, each page's
elementwise minimum and maximum key (over real, non-padding entries) are kept up to date. At a decode
step (one new token per row) in a layer at or above `dense_layers`, every page gets the upper bound

    bound(page) = sum_d max(q_d * min_d, q_d * max_d)  ( = q+ . max + q- . min )

of `q . k` over any key inside its box, per query head (plus the largest ALiBi bias in the page, for
ALiBi families), reduced to the KV head by the maximum over the heads sharing it. The top
`budget // page_size` pages per KV head are read -- the page holding the new token always -- gathered
into a short `[b, g, pages * page_size, d]` read, so attention's cost falls with the budget. Pages past
a sliding window or holding only padding are never chosen. Prefill and multi-token forwards read
densely, as does any step where the budget covers every page (the identity, bit for bit).

`hook_scores` shows the page bounds `[b, g, pages]`; `hook_keep` the entry indices read `[b, g, n]`
(a patch may write -1 to hide a slot).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from interp_cache.core.attention import StoredRows
from interp_cache.compress.base import Budget, CompressionPolicy, check_budget, check_int, resolve_budget
from interp_cache.core.hook_points import run_hook
from interp_cache.cache.ragged import PADDING_POSITION


@dataclass
class Quest(CompressionPolicy):
    budget: Budget = 512
    page_size: int = 16
    dense_layers: int = 2

    def __post_init__(self):
        check_budget(self.budget, "Quest budget")
        check_int(self.page_size, "Quest page_size", 1)
        check_int(self.dense_layers, "Quest dense_layers", 0)
        if isinstance(self.budget, int) and self.budget < self.page_size:
            raise ValueError(
                f"Quest budget ({self.budget} tokens) must be >= page_size ({self.page_size}): "
                "at least one page is read"
            )

    def check_model(self, model) -> None:
        super().check_model(model)
        if self.dense_layers >= model.num_layers:
            raise ValueError(
                f"Quest dense_layers must be < the model's {model.num_layers} layers (0..{model.num_layers - 1}) "
                f"so some layer selects pages; got {self.dense_layers}"
            )

    # -- page bounds, kept current as entries are written --------------------------------------------
    def after_write(self, layer, start: int) -> None:
        if layer.layer_idx < self.dense_layers:
            return
        size = self.page_size
        n = layer.physical_length
        first_page, num_pages = start // size, math.ceil(n / size)
        state = layer.policy_state
        b, g, _, d = layer.keys.shape
        if "page_max_min_bgen" not in state or state["page_max_min_bgen"].shape[-1] < num_pages:
            old_capacity = state["page_max_min_bgen"].shape[-1] if state else 0
            capacity = max(num_pages, old_capacity + old_capacity // 2)
            grown = {
                # rows 0..d-1: the page's elementwise max key, rows d..2d-1: its min (one matmul scores both)
                "page_max_min_bgen": layer.keys.new_empty((b, g, 2 * d, capacity)),
                "page_last_position": layer.positions.new_full((b, g, capacity), PADDING_POSITION),
            }
            for name, old in state.items():
                grown[name][..., : old.shape[-1]] = old
            state.update(grown)
        # Whole pages as one [b, g, pages, size, d] view; a partial last page on its own (no padding copy).
        whole_end = min(n, num_pages * size) // size * size
        for lo, hi in ((first_page * size, whole_end), (max(first_page * size, whole_end), n)):
            if hi <= lo:
                continue
            pages = math.ceil((hi - lo) / size)
            per_page = (hi - lo) // pages
            keys = layer.keys[:, :, lo:hi].reshape(b, g, pages, per_page, d)
            positions = layer.positions[:, :, lo:hi].reshape(b, g, pages, per_page)
            if layer.has_padding:  # bounds over real entries only
                real = (positions >= 0)[..., None]
                page_min = keys.masked_fill(~real, math.inf).amin(3)
                page_max = keys.masked_fill(~real, -math.inf).amax(3)
            else:
                page_min, page_max = keys.amin(3), keys.amax(3)
            page = slice(lo // size, lo // size + pages)
            state["page_max_min_bgen"][:, :, :d, page] = page_max.transpose(-1, -2)
            state["page_max_min_bgen"][:, :, d:, page] = page_min.transpose(-1, -2)
            state["page_last_position"][..., page] = positions.amax(3)

    # -- selection at a decode step ------------------------------------------------------------------
    def page_bounds(self, layer, query_bhpd: torch.Tensor, spec, query_positions_b: torch.Tensor) -> torch.Tensor:
        """Upper bound `[b, g, pages]` of the attention score any entry of each page can get."""
        num_pages = math.ceil(layer.physical_length / self.page_size)
        state = layer.policy_state
        page_max_min = state["page_max_min_bgen"][..., :num_pages]
        page_last = state["page_last_position"][..., :num_pages]
        b, h, _, d = query_bhpd.shape
        g = page_max_min.shape[1]
        query_bgrd = query_bhpd[:, :, 0].reshape(b, g, h // g, d)
        # sum_d max(q_d min_d, q_d max_d) = q+ . max + q- . min
        split_query = torch.cat([query_bgrd.clamp(min=0), query_bgrd.clamp(max=0)], dim=-1)
        bound_bgrn = torch.matmul(split_query, page_max_min)
        if spec.uses_alibi:  # slope * position grows with position: the page's last entry has the largest bias
            slopes_gr = spec.alibi_slopes.to(bound_bgrn.device).view(g, h // g) * spec.alibi_scale
            bias = slopes_gr[None, :, :, None] * page_last.clamp(min=0)[:, :, None, :]
            bound_bgrn = bound_bgrn.float() * spec.scaling + bias
        bound = bound_bgrn.amax(2).float()
        unreachable = page_last < 0
        if spec.sliding_window is not None:
            unreachable |= page_last <= query_positions_b[:, None, None] - spec.sliding_window
        bound = bound.masked_fill(unreachable, -math.inf)
        bound[:, :, -1] = math.inf  # the page holding the new token
        return bound

    def select_for_read(self, layer, query_bhpd, spec, context, hooks):
        if context.num_new != 1 or layer.layer_idx < self.dense_layers or layer.prefix is not None:
            return None  # (a head-wise cache patch left unequal heads: pages no longer line up, read densely)
        size = self.page_size
        n = layer.physical_length
        num_pages = math.ceil(n / size)
        pages_read = max(1, resolve_budget(self.budget, n) // size)
        if pages_read >= num_pages:
            return None
        bound = self.page_bounds(layer, query_bhpd, spec, context.positions[:, 0])
        bound = run_hook(hooks.hook_scores, bound, context)
        pages = bound.topk(pages_read, dim=-1).indices.sort(dim=-1).values  # [b, g, pages_read]
        index_bgn = (pages[..., None] * size + torch.arange(size, device=pages.device)).flatten(2)
        hidden = False
        if bool((pages[..., -1] == num_pages - 1).all()):
            # The newest page is every head's last and may be partial: end the read at the last entry, so
            # no slot is empty and attention needs no mask.
            index_bgn = index_bgn[..., : index_bgn.shape[-1] - (num_pages * size - n)]
        else:  # (a patched hook_scores dropped the newest page somewhere)
            index_bgn = index_bgn.masked_fill(index_bgn >= n, -1)
            hidden = bool((index_bgn < 0).any())
        patched = run_hook(hooks.hook_keep, index_bgn, context)
        if patched is not index_bgn:
            if bool(((patched < -1) | (patched >= n)).any()):
                raise ValueError(f"{hooks.hook_keep.name}: indices must be in [0, {n}) (or -1 for none)")
            hidden = bool((patched < 0).any())
        elif not hidden and layer.capacity % size == 0:
            return (*gather_pages(layer, pages, size, index_bgn.shape[-1]), False)
        return (*gather_entries(layer, patched), hidden)


def gather_entries(layer, index_bgn: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Keys, values `[b, g, n, d]` and positions `[b, g, n]` of tail entries `index_bgn` (-1: a hidden slot)."""
    b, g, capacity, d = layer.keys.shape
    row_start = (torch.arange(b * g, device=index_bgn.device) * capacity).view(b, g, 1)
    rows_bgn = row_start + index_bgn.clamp(min=0)
    keys = StoredRows(layer.keys.reshape(b * g * capacity, d), rows_bgn).materialize()
    values = StoredRows(layer.values.reshape(b * g * capacity, -1), rows_bgn).materialize()
    positions = layer.positions.reshape(-1)[rows_bgn].masked_fill(index_bgn < 0, PADDING_POSITION)
    return keys, values, positions


def gather_pages(layer, pages_bgm: torch.Tensor, page_size: int, length: int):
    """Keys `[b, g, m * page_size, d]` and positions of whole pages `pages_bgm` (ascending), the read cut at
    `length` entries, copied page by page; values stay in storage (`StoredRows`): a decode step mixes them
    from there, so the selected values are read once, not copied and read again."""
    b, g, capacity, d = layer.keys.shape
    pages_per_row = capacity // page_size
    row_start = (torch.arange(b * g, device=pages_bgm.device) * pages_per_row).view(b, g, 1)
    flat = (row_start + pages_bgm).reshape(-1)
    m = pages_bgm.shape[-1]

    def blocks(storage: torch.Tensor, width: int) -> torch.Tensor:
        by_page = storage.reshape(b * g * pages_per_row, page_size * width)
        return by_page.index_select(0, flat).view(b, g, m * page_size, width)[:, :, :length]

    keys = blocks(layer.keys, d)
    positions = blocks(layer.positions[..., None], 1)[..., 0]
    entry_rows = (flat.view(b, g, m, 1) * page_size + torch.arange(page_size, device=flat.device)).flatten(2)
    values = StoredRows(layer.values.reshape(b * g * capacity, -1), entry_rows[..., :length])
    return keys, values, positions
