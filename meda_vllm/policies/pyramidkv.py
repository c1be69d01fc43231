"""PyramidKV: SnapKV selection with budgets decreasing linearly from bottom to top."""

from __future__ import annotations

from dataclasses import dataclass

from meda_vllm.budgets import LayerBudgets, pyramid_budgets
from meda_vllm.policies.base import GetView
from meda_vllm.policies.knobs import knob, number
from meda_vllm.policies.snapkv import SnapKVPolicy


@dataclass(frozen=True)
class PyramidKVPolicy(SnapKVPolicy):
    name = "pyramidkv"

    beta: float = knob(
        20.0, number(1), "steepness of the pyramid budgets", setting="kv_pyramid_beta"
    )

    def layer_budgets(
        self, get_view: GetView, num_layers: int, n: int, budget: int
    ) -> LayerBudgets:
        return LayerBudgets(pyramid_budgets(num_layers, budget, n, self.beta, self.min_keep))
