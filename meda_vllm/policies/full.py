"""``full`` keeps everything (the machinery runs, nothing is evicted); ``none`` is stock vLLM."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from meda_vllm.budgets import LayerBudgets
from meda_vllm.policies.base import GetView, Policy
from meda_vllm.types import LayerView


@dataclass(frozen=True)
class FullPolicy(Policy):
    name = "full"
    evicts = False

    def raw_score(self, view: LayerView) -> Tensor:
        return torch.zeros(view.H_kv, view.N, device=view.device)

    def query_positions(self, n: int, vis: Tensor | None) -> Tensor:
        return torch.empty(0, dtype=torch.long)

    def max_query_rows(self, n: int) -> int:
        return 0

    def layer_budgets(
        self, get_view: GetView, num_layers: int, n: int, budget: int
    ) -> LayerBudgets:
        return LayerBudgets([n] * num_layers)


@dataclass(frozen=True)
class NonePolicy(FullPolicy):
    name = "none"
