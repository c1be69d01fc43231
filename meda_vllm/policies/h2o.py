"""H2O: heavy hitters by attention accumulated over the last ``kv_h2o_max_queries`` prompt
queries (exact H2O would use all of them), plus a recent window of half the budget."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from meda_vllm.config import KVPolicyConfig
from meda_vllm.policies.base import Policy, TierSpec


@dataclass(frozen=True)
class H2OPolicy(Policy):
    name = "h2o"
    pooled = False

    max_queries: int = 1024

    @classmethod
    def config_fields(cls, cfg: KVPolicyConfig) -> dict[str, Any]:
        return {**super().config_fields(cfg), "max_queries": cfg.kv_h2o_max_queries}

    def score_rows(self, n: int) -> int:
        return min(self.max_queries, n)

    def tier_spec(self, n: int, budget: int) -> TierSpec:
        return TierSpec(recent=max(min(self.window, budget), budget // 2))
