"""One cache layer through the life of a forward: write -> select -> read -> (attention) -> decide -> apply.

`HookedCacheLayer` is the transformers cache layer the hooked model's attention runner talks to. Its
entries live in a `LayerStorage`; this module is the order of events around them:

1. write: this forward's keys and values (after `hook_k_write` / `hook_v_write`) are appended with their
   true positions;
2. select (a selection policy, at a decode step): the policy scores pages, `hook_scores` may overwrite
   the scores, the policy chooses entries, `hook_keep` may overwrite the choice, storage gathers them;
3. read: `hook_positions`, `hook_k_read`, `hook_v_read` see (and may replace) what attention reads;
4. decide (an eviction policy, after attention): scores -> `hook_scores` -> keep-set -> `hook_keep`;
5. apply: the keep-set is carried out when the whole forward completes, so a forward that raises leaves
   the cache as it was (`rollback` undoes its writes).

The logical length (token slots fed, padding included) is what transformers sees through
`get_seq_length`; the physical length (entries stored) is what attention reads. The two differ once a
policy evicts, and positions of new tokens always come from the logical side.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from transformers.cache_utils import CacheLayerMixin

from interp_cache.cache.policy_interface import CachePolicy, Observation
from interp_cache.cache.storage import Arrangement, LayerStorage
from interp_cache.core.attention import AttentionSpec, CacheRead
from interp_cache.core.context import ForwardContext
from interp_cache.core.hook_points import (
    CacheHooks,
    CachedDecodingHookPoint,
    run_hook,
    run_hook_noting_change,
    tensor_version,
)


@dataclass(frozen=True)
class PendingEviction:
    """An eviction decided during a forward, carried out when the forward completes."""

    keep_bgn: torch.Tensor | None  # indices into what attention read; -1 pads heads that keep fewer
    running_scores: torch.Tensor | None
    budget: int | None
    ascending: bool = False  # the policy's own choice (`choose_keep`'s contract), not a hook's


class HookedCacheLayer(CacheLayerMixin):
    is_sliding = False
    is_compileable = False
    is_croppable = True

    def __init__(self, layer_idx: int = 0, num_layers: int = 1, policy: CachePolicy | None = None):
        # CacheLayerMixin.__init__ is not called: `keys` / `values` are views of the storage, not attributes.
        self.layer_idx = layer_idx
        self.num_layers = num_layers
        self.policy = policy
        self.storage = LayerStorage(
            keeps_entry_scores=policy is not None and policy.keeps_entry_scores,
            evict_headroom=None if policy is None else policy.storage_headroom(),
        )
        self.logical_length = 0
        self.pending: PendingEviction | None = None
        self.budget: int | None = None  # per-head budget of the last compression

    # -- what transformers and users read ------------------------------------------------------------
    @property
    def is_initialized(self) -> bool:
        return self.storage.is_initialized

    @property
    def keys(self) -> torch.Tensor | None:
        return self.storage.keys

    @property
    def values(self) -> torch.Tensor | None:
        return self.storage.values

    @property
    def physical_length(self) -> int:
        return self.storage.physical_length

    def read(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Keys, values `[b, g, k, d]` and positions `[b, g, k]` of the stored entries."""
        return self.storage.read()

    def kept_counts(self) -> torch.Tensor:
        """`[b, g]` real entries each head stores. Padding slots are not counted -- the one rule for every
        count a user sees: budgets (ratio budgets included) count real entries too. `slot_counts` has the
        storage's view."""
        if not self.is_initialized:
            raise ValueError(f"layer {self.layer_idx} holds no entries yet: run a forward on this cache first")
        return (self.read()[2] >= 0).sum(-1)

    def slot_counts(self) -> torch.Tensor:
        """`[b, g]` storage slots each head holds, padding slots included."""
        if not self.is_initialized:
            raise ValueError(f"layer {self.layer_idx} holds no entries yet: run a forward on this cache first")
        return self.storage.kept_counts()

    @property
    def nbytes(self) -> int:
        return self.storage.nbytes

    # -- the forward ---------------------------------------------------------------------------------
    def write_and_read(
        self,
        keys_bgpd: torch.Tensor,
        values_bgpd: torch.Tensor,
        context: ForwardContext,
        hooks: CacheHooks,
        query_bhpd: torch.Tensor,
        spec: AttentionSpec,
    ) -> CacheRead:
        """Append this forward's entries; return what attention reads."""
        storage = self.storage
        keys_bgpd = run_hook(hooks.hook_k_write, keys_bgpd, context)
        values_bgpd = run_hook(hooks.hook_v_write, values_bgpd, context)
        b, g, p, _ = keys_bgpd.shape
        self.store(keys_bgpd, values_bgpd, context.stored_positions[:, None, :].expand(b, g, p), p, context.has_padding)
        shared = storage.arrangement is Arrangement.ALIGNED
        hidden = storage.arrangement is Arrangement.RAGGED
        selection = None
        if self.policy is not None:
            selection = self._select(query_bhpd, spec, context, hooks)
        # A read of the uniform tail is a view of the stored entries; a ragged or selecting read is a copy.
        views_storage = selection is None and storage.prefix is None
        if selection is None:
            keys, values, positions = storage.read()
        else:
            keys, values, positions, selection_hides = selection
            shared, hidden = False, hidden or selection_hides
        if hooks.hook_positions.is_hooked():
            positions = _read_hook(hooks.hook_positions, positions, context, positions, views_storage)
            shared, hidden = False, True  # a patched position can hide an entry or differ between heads
        keys = _read_hook(hooks.hook_k_read, keys, context, positions, views_storage)
        if hooks.hook_v_read.is_hooked() and not isinstance(values, torch.Tensor):
            # The hook sees the values; attention mixes them from storage unless the hook replaced or edited them,
            # so a hook that only reads (or patches another step) leaves the arithmetic bit for bit alone.
            patched, changed = run_hook_noting_change(hooks.hook_v_read, values.materialize(), context, positions)
            values = patched if changed else values
        else:
            values = _read_hook(hooks.hook_v_read, values, context, positions, views_storage)
        return CacheRead(keys, values, positions, shared, storage.has_padding or hidden)

    def store(self, keys_bgpd, values_bgpd, positions_bgp, num_slots: int, has_padding: bool) -> None:
        """Append entries (a forward's write, after its hooks) for `num_slots` token slots; the policy's state
        follows. `interp_cache.decoding.replay` writes a prefilled cache's entries through here too."""
        start = self.storage.physical_length
        self.storage.append(keys_bgpd, values_bgpd, positions_bgp)
        self.logical_length += num_slots
        self.storage.has_padding = self.storage.has_padding or has_padding
        if self.policy is not None:
            self._track_writes(start)

    def _observe(self, query_bhpd, spec, context, keys_bgkd, positions_bgk, has_invisible_slots,
                 entry_scores=None, received_bhk=None) -> Observation:
        return Observation(
            self.layer_idx, self.num_layers, context, spec, query_bhpd, keys_bgkd, positions_bgk,
            self.storage.arrangement, has_invisible_slots, entry_scores, self.storage.policy_state, received_bhk,
        )

    def _track_writes(self, start: int) -> None:
        self.policy.track_writes(self.layer_idx, self.num_layers, self.storage.tail_view(), start,
                                 self.storage.policy_state)

    def _select(self, query_bhpd, spec, context, hooks: CacheHooks):
        """`(keys, values, positions, hides_slots)` of a selecting read, or None to read every entry."""
        tail = self.storage.tail_view()
        obs = self._observe(query_bhpd, spec, context, tail.keys, tail.positions, tail.has_padding)
        proposal = self.policy.propose_read(obs)
        if proposal is None:
            return None
        scores = run_hook(hooks.hook_scores, proposal.scores, context)
        choice = self.policy.choose_read(scores, obs)
        index_bgn, patched = _keep_hook(hooks, choice.index_bgn, context, self.storage.physical_length)
        hides = bool((index_bgn < 0).any())
        if (not patched and not hides and choice.pages_bgm is not None
                and self.storage.tiles_pages(choice.page_size)):
            return (*self.storage.gather_pages(choice.pages_bgm, choice.page_size, index_bgn.shape[-1]), False)
        return (*self.storage.gather_entries(index_bgn), hides)

    def wants_received_attention(self, query_bhpd, read: CacheRead, spec: AttentionSpec, context) -> bool:
        """Whether attention should hand this layer's policy the attention each entry received over every query
        (`interp_cache.core.received`): the policy scores with it and has evicted from this layer before.
        Until then the layer keeps the uncompressed arithmetic bit for bit -- so a prefill does not depend on
        the policy (`decoding.replay`) and a budget that covers every entry is the identity -- unless the
        policy asks otherwise for this forward (`single_pass_forward`)."""
        policy = self.policy
        if policy is None or not policy.scores_with_received_attention:
            return False
        if self.budget is not None:
            return True
        obs = self._observe(query_bhpd, spec, context, read.keys, read.positions, read.has_invisible_slots)
        return policy.single_pass_forward(obs)

    def after_attention(self, query_bhpd, read: CacheRead, spec: AttentionSpec, context, hooks: CacheHooks,
                        received_bhk: torch.Tensor | None = None) -> None:
        """Let an eviction policy choose what this layer keeps; carried out when the forward completes.
        `received_bhk`: what attention summed for the policy (`wants_received_attention`), if it did."""
        if self.policy is None:
            return
        obs = self._observe(query_bhpd, spec, context, read.keys, read.positions, read.has_invisible_slots,
                            self.storage.read_entry_scores(), received_bhk)
        proposal = self.policy.propose_eviction(obs)
        if proposal is None:
            self.pending = None
        elif proposal.scores is None:
            self.pending = PendingEviction(None, proposal.running_scores, None)
        else:
            scores = run_hook(hooks.hook_scores, proposal.scores, context, key_positions=read.positions)
            chosen = self.policy.choose_keep(scores, proposal.budget)
            keep, patched = _keep_hook(hooks, chosen, context, read.positions.shape[-1], read.positions)
            self.pending = PendingEviction(keep, proposal.running_scores, proposal.budget, not patched)

    def apply_pending(self) -> None:
        """Carry out the keep-set the policy chose during the forward that just completed."""
        pending, self.pending = self.pending, None
        if pending is None:
            return
        if pending.keep_bgn is not None:
            self.retain(pending.keep_bgn, pending.running_scores, pending.ascending)
            self.budget = pending.budget
        elif pending.running_scores is not None:
            self.storage.set_entry_scores(pending.running_scores)

    def retain(self, keep_bgn: torch.Tensor, entry_scores_bgk: torch.Tensor | None = None,
               ascending: bool = False) -> None:
        """Keep the entries of `read()` that `keep_bgn` lists per head (-1: none); the policy's state follows.
        `ascending`: the indices ascend with any -1 after them, as `choose_keep` returns them."""
        self.storage.retain(keep_bgn, entry_scores_bgk, ascending)
        if self.policy is not None:
            self._track_writes(0)

    def overwrite(self, keys_bgkd: torch.Tensor, values_bgkd: torch.Tensor, positions_bgk: torch.Tensor) -> None:
        """Replace the stored entries with an edited copy of `read()`; the policy's state follows."""
        self.storage.overwrite(keys_bgkd, values_bgkd, positions_bgk)
        if self.policy is not None:
            self._track_writes(0)

    def truncate(self, physical_length: int, logical_length: int) -> None:
        self.storage.truncate(physical_length)
        self.logical_length = logical_length

    def rollback(self, physical_length: int, logical_length: int) -> None:
        """Undo the writes of a forward that raised."""
        self.truncate(physical_length, logical_length)
        self.pending = None

    # -- transformers' Cache layer interface ---------------------------------------------------------
    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        raise RuntimeError("a HookedCacheLayer initializes its storage on the first write_and_read")

    def update(self, key_states, value_states, *args, **kwargs):
        raise RuntimeError(
            "HookedCache is written by interp_cache's attention core, which knows each entry's true position; "
            "a transformers attention module called update() directly, so this model is not wrapped by HookedModel."
        )

    def get_seq_length(self) -> int:
        return self.logical_length

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.logical_length + query_length, 0

    def get_max_length(self) -> int:
        return -1

    def reset(self) -> None:
        self.storage = LayerStorage(self.storage.keeps_entry_scores, self.storage.evict_headroom)
        self.logical_length = 0
        self.pending = None
        self.budget = None

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        self.batch_select_indices(beam_idx)

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        self.storage.batch_select(indices)

    def batch_repeat_interleave(self, repeats: int) -> None:
        self.storage.batch_repeat_interleave(repeats)

    def crop(self, tokens_to_remove: int) -> None:
        if tokens_to_remove > 0:
            tokens_to_remove = self.logical_length - tokens_to_remove
        if tokens_to_remove == 0:
            return
        removed = abs(tokens_to_remove)
        if self.storage.arrangement is not Arrangement.ALIGNED or self.physical_length != self.logical_length:
            raise ValueError(
                f"cannot rewind/crop layer {self.layer_idx}: a compression policy evicted entries, so the last "
                "token slots are no longer all stored; fork() the cache before the step you want to return to"
            )
        self.truncate(self.physical_length - removed, self.logical_length - removed)


def _read_hook(point: CachedDecodingHookPoint, read: torch.Tensor, context: ForwardContext,
               key_positions: torch.Tensor, views_storage: bool) -> torch.Tensor:
    """`run_hook` on what attention reads. Where the read is a view of the stored entries, an in-place edit
    would change the cache for every later forward, not this read: refused, naming the two ways to do either."""
    if not point.is_hooked():
        return read
    version = tensor_version(read) if views_storage else None
    result = run_hook(point, read, context, key_positions=key_positions)
    if version is not None and tensor_version(read) != version:
        raise ValueError(
            f"{point.name}: the hook edited the cache's stored entries in place (this read is a view of the "
            "cache's storage, so the edit would outlive this forward); return an edited copy to change what "
            "attention reads now, or change the cache itself between forwards with cache.replace_entries(); "
            "this cache already holds the edit, so start again from a fresh (or forked) one"
        )
    return result


def _keep_hook(hooks: CacheHooks, chosen_bgn: torch.Tensor, context: ForwardContext, num_entries: int,
               key_positions: torch.Tensor | None = None) -> tuple[torch.Tensor, bool]:
    """`(indices, patched)` after `hook_keep`. A patched choice -- returned or edited in place -- is checked
    against the entries in question; the policy's own is trusted (its order included: `choose_keep`)."""
    keep_bgn, patched = run_hook_noting_change(hooks.hook_keep, chosen_bgn, context, key_positions)
    if patched:
        _check_indices(hooks, keep_bgn, num_entries)
    return keep_bgn, patched


def _check_indices(hooks: CacheHooks, index_bgn: torch.Tensor, num_entries: int) -> None:
    """A (patched) choice must index the entries in question; -1 marks an empty slot."""
    if bool(((index_bgn < -1) | (index_bgn >= num_entries)).any()):
        raise ValueError(
            f"{hooks.hook_keep.name}: indices must be in [0, {num_entries}) (or -1 for none); got "
            f"{int(index_bgn.min())}..{int(index_bgn.max())}"
        )
