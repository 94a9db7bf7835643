"""HeadWise: a policy per KV head -- e.g. the full cache for retrieval heads and a short StreamingLLM window
for every other head (the DuoAttention / RazorAttention split, Xiao et al. 2024, Tang et al. 2024).

`HeadWise({(layer, kv_head): policy_or_None, ...}, default=policy_or_None)`: the head `(layer, kv_head)`
follows its own policy, every head not listed follows `default`; None keeps that head's whole cache.
Heads are KV heads (under GQA the query heads `kv_head * group ... (kv_head + 1) * group - 1` share one).
Each member scores every head of the layer as it would alone; each head keeps its own member's budget of
its own member's top scores, so a head's entries are exactly those its policy alone would keep there. The
unequal counts are stored compactly (`interp_cache.cache.ragged`): the bytes are the entries kept.

Members are eviction policies with no running state of their own (StreamingLLM, SnapKV, PyramidKV,
KNorm, Random): a composition with H2O's accumulated scores, AdaKV's layer-wide split or Quest's page
selection has no per-head meaning and is refused.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field

import torch

from interp_cache.cache.policy_interface import Observation, Proposal
from interp_cache.compress.base import CompressionPolicy, EvictionPolicy
from interp_cache.compress.registry import policy_classes
from interp_cache.compress.streaming_llm import StreamingLLM
from interp_cache.core.context import ForwardContext

Member = EvictionPolicy | None


def _composable(cls: type) -> bool:
    return issubclass(cls, EvictionPolicy) and not cls.keeps_entry_scores and cls.wraps is None


def _check_member(member, where: str) -> None:
    if member is None:
        return
    if not isinstance(member, CompressionPolicy) or not _composable(type(member)):
        accepted = [cls.__name__ for cls in policy_classes() if _composable(cls)]
        raise ValueError(
            f"HeadWise {where} must be None (the whole cache) or one of {', '.join(accepted)}; "
            f"got {type(member).__name__}"
        )


@dataclass
class HeadWise(CompressionPolicy, name="headwise"):
    heads: Mapping[tuple[int, int], Member] = field(default_factory=dict)
    default: Member = None

    evicts = True

    def __post_init__(self):
        if not isinstance(self.heads, Mapping):
            raise ValueError(
                "HeadWise heads must be a dict {(layer, kv_head): policy or None} (built in Python: the "
                f"command-line spec cannot express it); got {type(self.heads).__name__}"
            )
        for key, member in self.heads.items():
            if (not isinstance(key, tuple) or len(key) != 2
                    or not all(isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in key)):
                raise ValueError(f"HeadWise heads are keyed by (layer, kv_head), two integers >= 0; got {key!r}")
            _check_member(member, f"heads[{key}]")
        _check_member(self.default, "default")
        self.heads = dict(self.heads)
        members = self._members()
        self.evicts_during_decoding = any(m.evicts_during_decoding for m in members)

    @classmethod
    def covering(cls, num_tokens):
        return cls({(0, 0): None}, default=StreamingLLM.covering(num_tokens))

    def _members(self) -> list[EvictionPolicy]:
        distinct = []
        for member in [self.default, *self.heads.values()]:
            if member is not None and not any(member is seen for seen in distinct):
                distinct.append(member)
        return distinct

    def check_model(self, model) -> None:
        super().check_model(model)
        for member in self._members():
            member.check_model(model)
        for layer, kv_head in self.heads:
            if layer >= model.num_layers:
                raise ValueError(f"HeadWise head ({layer}, {kv_head}): the model has layers 0..{model.num_layers - 1}")
            num_kv_heads = model.blocks[layer].cache.hook_k_write.layout.size("kv_head")
            if kv_head >= num_kv_heads:
                raise ValueError(
                    f"HeadWise head ({layer}, {kv_head}): layer {layer} has KV heads 0..{num_kv_heads - 1}"
                )

    def eviction_slack(self) -> int:
        return max((member.eviction_slack() for member in self._members()), default=0)

    def member_of(self, layer_idx: int, kv_head: int) -> Member:
        return self.heads.get((layer_idx, kv_head), self.default)

    def compresses_now(self, context: ForwardContext) -> bool:
        return any(member.compresses_now(context) for member in self._members())

    def propose_eviction(self, obs: Observation) -> Proposal | None:
        """Each head's scores and budget from its own member; heads whose member keeps all score +inf (padding
        -inf) with a budget of every entry."""
        if not self.compresses_now(obs.context):
            return None
        positions = obs.positions_bgk
        b, g, k = positions.shape
        keep_all = torch.full_like(positions, math.inf, dtype=torch.float32).masked_fill(positions < 0, -math.inf)
        budget_bg = torch.full((b, g), k, dtype=torch.long, device=positions.device)
        proposals = {}
        scores_per_head = []
        for kv_head in range(g):
            member = self.member_of(obs.layer_idx, kv_head)
            if member is not None and id(member) not in proposals:
                proposals[id(member)] = member.propose_eviction(obs)
            proposal = None if member is None else proposals[id(member)]
            if proposal is None or proposal.scores is None:
                scores_per_head.append(keep_all[:, kv_head])
                continue
            scores_per_head.append(proposal.scores[:, kv_head].float())
            member_budget = proposal.budget
            budget_bg[:, kv_head] = member_budget[:, kv_head] if isinstance(member_budget, torch.Tensor) else member_budget
        if bool((budget_bg >= k).all()):
            return None
        return Proposal(torch.stack(scores_per_head, dim=1), budget_bg)
