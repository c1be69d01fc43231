"""H2O: heavy hitters by attention accumulated over the last ``kv_h2o_max_queries`` prompt
queries (exact H2O would use all of them), plus a recent window of half the budget."""

from __future__ import annotations

from dataclasses import dataclass

from meda_vllm.policies.base import Policy, TierSpec
from meda_vllm.policies.knobs import integer, knob


@dataclass(frozen=True)
class H2OPolicy(Policy):
    name = "h2o"
    pooled = False

    max_queries: int = knob(
        1024, integer(1), "prompt queries the attention is accumulated over (the last ones)"
    )

    def score_rows(self, n: int) -> int:
        return min(self.max_queries, n)

    def tier_spec(self, n: int, budget: int) -> TierSpec:
        return TierSpec(recent=max(min(self.window, budget), budget // 2))
