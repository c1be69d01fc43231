"""LOOK-M: text first, then a recent window and the top visual tokens by accumulated
attention; evicted entries are merged into their nearest kept key (``average`` by default).

The two ratios split the budget: ``recent / (recent + topk)`` of it is the recent window.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from meda_vllm.policies.base import Policy, TierSpec
from meda_vllm.policies.knobs import knob, number


@dataclass(frozen=True)
class LookMPolicy(Policy):
    name = "lookm"
    default_merge = "average"
    pooled = False

    recent_ratio: float = knob(0.1, number(0, 1), "the recent window's share of the split")
    topk_ratio: float = knob(0.1, number(0, 1), "the top tokens' share of the split")

    @classmethod
    def check_settings(cls, values: dict[str, Any]) -> None:
        recent, topk = values["kv_lookm_recent_ratio"], values["kv_lookm_topk_ratio"]
        if recent + topk <= 0:
            raise ValueError(
                f"kv_lookm_recent_ratio + kv_lookm_topk_ratio must be > 0 (got {recent} + {topk})"
            )

    def tier_spec(self, n: int, budget: int) -> TierSpec:
        share = self.recent_ratio / (self.recent_ratio + self.topk_ratio)
        recent = max(min(self.window, budget), round(share * budget))
        return TierSpec(recent=recent, text_first=True)
