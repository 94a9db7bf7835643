"""Policies from a one-line spec, for the command line: `name:key=value,key=value`.

    parse_policy("snapkv:budget=64,window=8")     -> SnapKV(budget=64, window=8)
    parse_policy("adakv:budget=64,alpha=0.2")     -> AdaKV(SnapKV(budget=64), alpha=0.2)
    parse_policy("adakv:base=pyramidkv,budget=64") -> AdaKV(PyramidKV(budget=64))
    parse_policy("quest:budget=0.25,page_size=16") -> Quest(budget=0.25, page_size=16)

Values are read as int, then float, else kept as text. AdaKV takes `base` and `alpha`; every other key
goes to its base policy (SnapKV unless `base=` says otherwise).
"""

from __future__ import annotations

from dataclasses import fields

from interp_cache.compress.adakv import AdaKV
from interp_cache.compress.h2o import H2O
from interp_cache.compress.knorm import KNorm
from interp_cache.compress.pyramidkv import PyramidKV
from interp_cache.compress.quest import Quest
from interp_cache.compress.random_eviction import Random
from interp_cache.compress.snapkv import SnapKV
from interp_cache.compress.streaming_llm import StreamingLLM

POLICIES = {
    "streamingllm": StreamingLLM, "h2o": H2O, "snapkv": SnapKV, "pyramidkv": PyramidKV, "adakv": AdaKV,
    "quest": Quest, "random": Random, "knorm": KNorm,
}


def _value(text: str):
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return text


def _build(name: str, params: dict):
    policy_class = POLICIES.get(name.lower())
    if policy_class is None:
        raise ValueError(f"unknown compression policy {name!r}; accepted: {', '.join(POLICIES)}")
    accepted = {f.name for f in fields(policy_class)}
    unknown = set(params) - accepted
    if unknown:
        raise ValueError(f"{name} has no parameter {', '.join(sorted(unknown))}; accepted: {', '.join(sorted(accepted))}")
    return policy_class(**params)


def parse_policy(spec: str):
    name, _, rest = spec.partition(":")
    params = {}
    for item in filter(None, rest.split(",")):
        key, sep, value = item.partition("=")
        if not sep:
            raise ValueError(f"compression spec items are key=value; got {item!r} in {spec!r}")
        params[key.strip()] = _value(value.strip())
    if name.lower() == "adakv":
        base_name = str(params.pop("base", "snapkv"))
        if base_name.lower() == "adakv":
            raise ValueError("adakv base cannot be adakv")
        adakv_params = {key: params.pop(key) for key in ("alpha",) if key in params}
        return AdaKV(base=_build(base_name, params), **adakv_params)
    return _build(name, params)
