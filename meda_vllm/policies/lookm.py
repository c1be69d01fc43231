"""LOOK-M: text first, then a recent window and the top visual tokens by accumulated
attention; evicted entries are merged into their nearest kept key (``average`` by default).

The two ratios split the budget: ``recent / (recent + topk)`` of it is the recent window.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from meda_vllm.config import KVPolicyConfig
from meda_vllm.policies.base import Policy, TierSpec


@dataclass(frozen=True)
class LookMPolicy(Policy):
    name = "lookm"
    default_merge = "average"
    pooled = False

    recent_ratio: float = 0.1
    topk_ratio: float = 0.1

    @classmethod
    def config_fields(cls, cfg: KVPolicyConfig) -> dict[str, Any]:
        return {
            **super().config_fields(cfg),
            "recent_ratio": cfg.kv_lookm_recent_ratio,
            "topk_ratio": cfg.kv_lookm_topk_ratio,
        }

    def tier_spec(self, n: int, budget: int) -> TierSpec:
        share = self.recent_ratio / (self.recent_ratio + self.topk_ratio)
        recent = max(min(self.window, budget), round(share * budget))
        return TierSpec(recent=recent, text_first=True)
