"""LOOK-M: text first, then a recent window and the top visual tokens by accumulated
attention; evicted entries are merged into their nearest kept key (``average`` by default).

The two ratios split the budget: ``recent / (recent + topk)`` of it is the recent window.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from meda_vllm.config import KVPolicyConfig
from meda_vllm.policies.base import Policy
from meda_vllm.selection import recent_mask
from meda_vllm.types import LayerView


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

    def tiers(self, view: LayerView, budget: int) -> Tensor:
        share = self.recent_ratio / (self.recent_ratio + self.topk_ratio)
        recent = max(min(self.window, budget), round(share * budget))
        tier = 2 * recent_mask(view.N, recent, view.device).to(torch.int64)
        if view.vis is not None:
            text = ~view.vis.to(tier.device)
            tier = torch.where(tier == 0, text.to(torch.int64), tier)
        return tier
