"""Quest (Tang et al., 2024): query-aware page selection. Nothing is evicted; each decode step reads only
the pages whose keys can score highest for its query.

The cache is cut into pages of `page_size` consecutive entries, each row's pages starting at real positions
that are multiples of `page_size` (a left-padded row's page grid is shifted by its padding), so a prompt's
pages -- and what it reads -- are the same alone or beside a longer one. As entries are written, each page's
elementwise minimum and maximum key (over real, non-padding entries) are kept up to date. At a decode
step (one new token per row) in a layer at or above `dense_layers`, every page gets the upper bound

    bound(page) = sum_d max(q_d * min_d, q_d * max_d)  ( = q+ . max + q- . min )

of `q . k` over any key inside its box, per query head (plus the largest ALiBi bias in the page, for
ALiBi families), reduced to the KV head by the maximum over the heads sharing it. The top
`budget // page_size` pages per KV head are read -- the page holding the new token always -- gathered
into a short `[b, g, pages * page_size, d]` read, so attention's cost falls with the budget. Pages past
a sliding window or holding only padding are never chosen. Prefill and multi-token forwards read
densely, as does any step where the budget covers every page (the identity, bit for bit).
`dense_layers=None` (the default) is the paper's 2 dense layers on models deeper than 2 layers, and all
but the last layer on shallower ones, so the defaults run on every model.

`hook_scores` shows the page bounds `[b, g, pages]`; `hook_keep` the entry indices read `[b, g, n]`
(a patch may write -1 to hide a slot). Quest only scores and chooses; the cache layer gathers what it chose
(whole pages copied as blocks, the values mixed straight from storage).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from interp_cache.cache.policy_interface import Observation, Proposal, ReadChoice
from interp_cache.cache.storage import Arrangement, StoredEntries
from interp_cache.compress.base import (
    Budget,
    CompressionPolicy,
    check_budget,
    check_int,
    resolve_budget,
    top_per_head,
)
from interp_cache.core.context import PADDING_POSITION


@dataclass
class Quest(CompressionPolicy, name="quest"):
    budget: Budget = 512
    page_size: int = 16
    dense_layers: int | None = None

    def __post_init__(self):
        check_budget(self.budget, "Quest budget")
        check_int(self.page_size, "Quest page_size", 1)
        if self.dense_layers is not None:
            check_int(self.dense_layers, "Quest dense_layers (or None: 2, fewer on models of <= 2 layers)", 0)
        if isinstance(self.budget, int) and self.budget < self.page_size:
            raise ValueError(
                f"Quest budget ({self.budget} tokens) must be >= page_size ({self.page_size}): "
                "at least one page is read"
            )

    @classmethod
    def covering(cls, num_tokens):
        return cls(budget=num_tokens, page_size=1, dense_layers=0)

    def check_model(self, model) -> None:
        super().check_model(model)
        if self.dense_layers is not None and self.dense_layers >= model.num_layers:
            raise ValueError(
                f"Quest dense_layers must be < the model's {model.num_layers} layers (0..{model.num_layers - 1}) "
                f"so some layer selects pages; got {self.dense_layers}"
            )

    # -- page bounds, kept current as entries are written --------------------------------------------
    def dense_for(self, num_layers: int) -> int:
        """Layers read densely: the given count, or the paper's 2 where the model has more than 2 layers and
        `num_layers - 1` otherwise, so some layer selects pages."""
        return self.dense_layers if self.dense_layers is not None else min(2, num_layers - 1)

    def track_writes(self, layer_idx: int, num_layers: int, stored: StoredEntries, start: int, state: dict) -> None:
        if layer_idx < self.dense_for(num_layers):
            return
        size = self.page_size
        b, g, n, d = stored.keys.shape
        shift_b = self._page_shifts(stored, start, state)
        max_shift = int(shift_b.max())
        first_page = (start + int(shift_b.min())) // size
        num_pages = math.ceil((n + max_shift) / size)
        if "page_max_min_bgen" not in state or state["page_max_min_bgen"].shape[-1] < num_pages:
            old = {name: state[name] for name in ("page_max_min_bgen", "page_last_position") if name in state}
            old_capacity = old["page_max_min_bgen"].shape[-1] if old else 0
            capacity = max(num_pages, old_capacity + old_capacity // 2)
            grown = {
                # rows 0..d-1: the page's elementwise max key, rows d..2d-1: its min (one matmul scores both)
                "page_max_min_bgen": stored.keys.new_empty((b, g, 2 * d, capacity)),
                "page_last_position": stored.positions.new_full((b, g, capacity), PADDING_POSITION),
            }
            for name, tensor in old.items():
                grown[name][..., : tensor.shape[-1]] = tensor
            state.update(grown)
        if max_shift:
            spans = [self._shifted_pages(stored, shift_b, first_page, num_pages)]
        else:
            spans = self._aligned_pages(stored, first_page, num_pages)
        for page_start, keys_bgpsd, positions_bgps in spans:
            if stored.has_padding:  # bounds over real entries only
                real = (positions_bgps >= 0)[..., None]
                page_min = keys_bgpsd.masked_fill(~real, math.inf).amin(3)
                page_max = keys_bgpsd.masked_fill(~real, -math.inf).amax(3)
            else:
                page_min, page_max = keys_bgpsd.amin(3), keys_bgpsd.amax(3)
            page = slice(page_start, page_start + keys_bgpsd.shape[2])
            state["page_max_min_bgen"][:, :, :d, page] = page_max.transpose(-1, -2)
            state["page_max_min_bgen"][:, :, d:, page] = page_min.transpose(-1, -2)
            state["page_last_position"][..., page] = positions_bgps.amax(3)

    def _page_shifts(self, stored: StoredEntries, start: int, state: dict) -> torch.Tensor:
        """`[b]` slots each row's page grid is shifted by, so that pages start at real positions that are
        multiples of `page_size` whatever the row's left padding: a prompt's pages are the same alone or
        padded beside a longer one. Fixed when the row's first entries are written (start 0)."""
        if start == 0 or "page_shift_b" not in state:
            leading_padding_b = (stored.positions[:, 0] >= 0).int().argmax(-1)
            state["page_shift_b"] = (-leading_padding_b) % self.page_size
        return state["page_shift_b"]

    def _aligned_pages(self, stored: StoredEntries, first_page: int, num_pages: int):
        """Whole pages as one `[b, g, pages, size, d]` view; a partial last page on its own (no copy)."""
        size = self.page_size
        b, g, n, d = stored.keys.shape
        whole_end = min(n, num_pages * size) // size * size
        for lo, hi in ((first_page * size, whole_end), (max(first_page * size, whole_end), n)):
            if hi > lo:
                pages = math.ceil((hi - lo) / size)
                per_page = (hi - lo) // pages
                yield (lo // size, stored.keys[:, :, lo:hi].reshape(b, g, pages, per_page, d),
                       stored.positions[:, :, lo:hi].reshape(b, g, pages, per_page))

    def _shifted_pages(self, stored: StoredEntries, shift_b: torch.Tensor, first_page: int, num_pages: int):
        """Pages `first_page..num_pages-1` of each row's shifted grid, gathered (slots outside: padding)."""
        size = self.page_size
        b, g, n, d = stored.keys.shape
        virtual = torch.arange(first_page * size, num_pages * size, device=stored.keys.device)
        slot_bv = virtual[None, :] - shift_b[:, None]
        outside_bv = (slot_bv < 0) | (slot_bv >= n)
        index_bgv = slot_bv.clamp(0, n - 1)[:, None, :].expand(b, g, -1)
        keys = stored.keys.gather(2, index_bgv[..., None].expand(-1, -1, -1, d))
        positions = stored.positions.gather(2, index_bgv).masked_fill(outside_bv[:, None, :], PADDING_POSITION)
        pages = num_pages - first_page
        return first_page, keys.view(b, g, pages, size, d), positions.view(b, g, pages, size)

    # -- selection at a decode step ------------------------------------------------------------------
    def page_bounds(self, obs: Observation) -> torch.Tensor:
        """Upper bound `[b, g, pages]` of the attention score any entry of each page can get."""
        shift_b = obs.policy_state["page_shift_b"]
        num_pages = math.ceil((obs.num_entries + int(shift_b.max())) / self.page_size)
        page_max_min = obs.policy_state["page_max_min_bgen"][..., :num_pages]
        page_last = obs.policy_state["page_last_position"][..., :num_pages]
        spec, query_bhpd = obs.spec, obs.query_bhpd
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
            query_positions_b = obs.context.positions[:, 0]
            unreachable |= page_last <= query_positions_b[:, None, None] - spec.sliding_window
        bound = bound.masked_fill(unreachable, -math.inf)
        newest_page_b = (obs.num_entries - 1 + shift_b) // self.page_size  # the page holding the new token
        bound.scatter_(-1, newest_page_b[:, None, None].expand(b, g, 1), math.inf)
        return bound

    def propose_read(self, obs: Observation) -> Proposal | None:
        if obs.context.num_new != 1 or obs.layer_idx < self.dense_for(obs.num_layers) or obs.arrangement is Arrangement.RAGGED:
            return None  # (a head-wise cache patch left unequal heads: pages no longer line up, read densely)
        n = obs.num_entries
        if self._pages_read(n) >= math.ceil((n + int(obs.policy_state["page_shift_b"].max())) / self.page_size):
            return None
        return Proposal(self.page_bounds(obs))

    def _pages_read(self, num_entries: int) -> int:
        return max(1, resolve_budget(self.budget, num_entries) // self.page_size)

    def choose_read(self, scores: torch.Tensor, obs: Observation) -> ReadChoice:
        """The top pages' entries, ascending; the read ends at the newest entry when its page is every head's last."""
        size, n = self.page_size, obs.num_entries
        shift_b = obs.policy_state["page_shift_b"]
        pages = top_per_head(scores, self._pages_read(n))  # [b, g, pages read]
        if bool(shift_b.any()):  # row grids shifted by their padding: gather entry by entry
            slots = pages[..., None] * size + torch.arange(size, device=pages.device) - shift_b[:, None, None, None]
            index_bgn = slots.flatten(2)
            return ReadChoice(index_bgn.masked_fill((index_bgn < 0) | (index_bgn >= n), -1))
        num_pages = math.ceil(n / size)
        index_bgn = (pages[..., None] * size + torch.arange(size, device=pages.device)).flatten(2)
        if bool((pages[..., -1] == num_pages - 1).all()):
            # The newest page may be partial: end the read at the last entry, so no slot is empty and
            # attention needs no mask.
            index_bgn = index_bgn[..., : index_bgn.shape[-1] - (num_pages * size - n)]
        else:  # (a patched hook_scores dropped the newest page somewhere)
            index_bgn = index_bgn.masked_fill(index_bgn >= n, -1)
        return ReadChoice(index_bgn, pages, size)
