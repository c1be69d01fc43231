"""PyramidKV: SnapKV selection with budgets decreasing linearly from bottom to top."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from meda_vllm.budgets import LayerBudgets, pyramid_budgets
from meda_vllm.config import KVPolicyConfig
from meda_vllm.policies.base import GetView
from meda_vllm.policies.snapkv import SnapKVPolicy


@dataclass(frozen=True)
class PyramidKVPolicy(SnapKVPolicy):
    name = "pyramidkv"

    beta: float = 20.0

    @classmethod
    def config_fields(cls, cfg: KVPolicyConfig) -> dict[str, Any]:
        return {**super().config_fields(cfg), "beta": cfg.kv_pyramid_beta}

    def layer_budgets(
        self, get_view: GetView, num_layers: int, n: int, budget: int
    ) -> LayerBudgets:
        return LayerBudgets(pyramid_budgets(num_layers, budget, n, self.beta, self.min_keep))
