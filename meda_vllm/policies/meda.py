"""MEDA: layer budgets from cross-modal attention entropy, a recent window plus the top
tokens (text first), and merging of the evicted entries (``average`` by default)."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from meda_vllm.budgets import LayerBudgets, entropy_budgets, uniform_budgets
from meda_vllm.entropy import layer_entropy_value, to_host_floats
from meda_vllm.modality import entropy_query_positions
from meda_vllm.policies.base import GetView, Policy, TierSpec
from meda_vllm.policies.knobs import BOOLEAN, integer, knob, number
from meda_vllm.types import LayerView


@dataclass(frozen=True)
class MEDAPolicy(Policy):
    name = "meda"
    default_merge = "average"

    recent_fraction: float = knob(
        0.75, number(0, 1), "share of a layer's budget kept as the recent window"
    )
    renormalize: bool = knob(True, BOOLEAN, "renormalise the entropy budgets to the mean")
    entropy_causal: bool = knob(False, BOOLEAN, "causal mask in the cross-modal entropy")
    visual_stride: int = knob(8, integer(1), "sample every k-th visual query row for entropy")
    visual_rows: int = knob(
        128, integer(0, "0: no cap"), "cap on the sampled visual rows (the stride grows)"
    )

    def query_positions(self, n: int, vis: Tensor | None) -> Tensor:
        window = super().query_positions(n, vis)
        return torch.unique(torch.cat([window, self.entropy_positions(n, vis)]))

    def max_query_rows(self, n: int) -> int:
        # the window, the text rows standing in for it when it holds none, and the sampled
        # visual rows (capped, else one in visual_stride)
        visual = self.visual_rows or -(-n // self.visual_stride)
        return min(n, 2 * self.window + visual)

    def entropy_positions(self, n: int, vis: Tensor | None) -> Tensor:
        """The rows of the sampled entropy (``modality.entropy_query_positions``)."""
        return entropy_query_positions(n, vis, self.window, self.visual_stride, self.visual_rows)

    def tier_spec(self, n: int, budget: int) -> TierSpec:
        # Recent window M (at least the observation window), then text before vision.
        recent = max(min(self.window, budget), round(self.recent_fraction * budget))
        return TierSpec(recent=recent, text_first=True)

    def layer_budgets(
        self, get_view: GetView, num_layers: int, n: int, budget: int
    ) -> LayerBudgets:
        # Pass 1 over the layers: one entropy each. The selection pass reads the views again.
        # Device values stay on the device until all layers are read: one host copy.
        values, vis = [], None
        for layer in range(num_layers):
            view = get_view(layer)
            vis = view.vis
            values.append(
                layer_entropy_value(
                    view, self.window, self.visual_stride, self.entropy_causal, self.visual_rows
                )
            )
        return self._budgets(to_host_floats(values), vis, num_layers, n, budget)

    def layer_budgets_set(
        self, view: LayerView, num_layers: int, n: int, budget: int
    ) -> LayerBudgets | None:
        # The engine's entropies of all layers at once (``[L]``): one host copy, no views.
        if view.entropy is None:
            return None
        entropy = [float(e) for e in view.entropy.double().tolist()]
        return self._budgets(entropy, view.vis, num_layers, n, budget)

    def _budgets(
        self, entropy: list[float], vis: Tensor | None, num_layers: int, n: int, budget: int
    ) -> LayerBudgets:
        if any(math.isnan(e) for e in entropy):
            if vis is None or not bool(vis.any()):
                reason = "text_only"
            elif bool(vis.all()):
                reason = "vision_only"
            else:
                reason = "no_cross_modal_rows"
            return LayerBudgets(uniform_budgets(num_layers, budget), None, reason)
        budgets = entropy_budgets(entropy, budget, n, self.min_keep, renormalize=self.renormalize)
        return LayerBudgets(budgets, entropy, None)
