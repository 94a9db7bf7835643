"""KV-cache compression policies: one file per method, each a dataclass of parameters plus its scoring.

    model.generate(ids, max_new_tokens=32, compress=AdaKV(SnapKV(budget=64), alpha=0.2))
    cache = model.new_cache(compress=Quest(budget=256, page_size=16, dense_layers=2))

Eviction policies (StreamingLLM, H2O, SnapKV, PyramidKV, AdaKV, Random, KNorm) remove entries from the
cache; Quest keeps them all and reads the pages a decode step's query can use most.
"""

from interp_cache.compress.adakv import AdaKV
from interp_cache.compress.base import CompressionPolicy, EvictionPolicy
from interp_cache.compress.h2o import H2O
from interp_cache.compress.knorm import KNorm
from interp_cache.compress.pyramidkv import PyramidKV
from interp_cache.compress.quest import Quest
from interp_cache.compress.random_eviction import Random
from interp_cache.compress.snapkv import SnapKV
from interp_cache.compress.streaming_llm import StreamingLLM

__all__ = [
    "AdaKV", "CompressionPolicy", "EvictionPolicy", "H2O", "KNorm", "PyramidKV", "Quest", "Random", "SnapKV",
    "StreamingLLM",
]
