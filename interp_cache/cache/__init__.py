"""The position-true KV cache: storage, the per-forward lifecycle of a layer, and editing between steps.

    storage.py           keys, values, true positions; uniform tail + ragged head-wise prefix; gathers
    ragged.py            head-wise entries of unequal count stored back to back
    stored_rows.py       values left in storage, mixed from there by a single-query read
    policy_interface.py  what a compression policy sees (Observation) and returns (Proposal, ReadChoice)
    layer.py             HookedCacheLayer: write -> select -> read -> decide -> apply / rollback
    editing.py           read / replace / delete entries, fork, rewind
    hooked_cache.py      HookedCache: the layers, next positions, decode steps, bytes
"""

from interp_cache.cache.hooked_cache import HookedCache
from interp_cache.cache.layer import HookedCacheLayer
from interp_cache.cache.storage import Arrangement, LayerStorage

__all__ = ["Arrangement", "HookedCache", "HookedCacheLayer", "LayerStorage"]
