"""KV-cache compression policies: one file per method, each a registered dataclass of parameters plus its scoring.

    model.generate(ids, max_new_tokens=32, compress=AdaKV(SnapKV(budget=64), alpha=0.2))
    cache = model.new_cache(compress=Quest(budget=256, page_size=16))

Eviction policies (StreamingLLM, H2O, SnapKV, PyramidKV, AdaKV, Random, KNorm) remove entries from the
cache; Quest keeps them all and reads the pages a decode step's query can use most. Every module of this
package is imported here, so each policy registers itself (`registry.py`) and is exported under its class
name: a new policy is a new file, nothing else.
"""

import importlib
import pkgutil

from interp_cache.compress.base import CompressionPolicy, EvictionPolicy
from interp_cache.compress.registry import policy_classes, policy_names

for _module in pkgutil.iter_modules(__path__):
    importlib.import_module(f"{__name__}.{_module.name}")

globals().update({cls.__name__: cls for cls in policy_classes()})

__all__ = ["CompressionPolicy", "EvictionPolicy", "policy_classes", "policy_names"] + [
    cls.__name__ for cls in policy_classes()
]
