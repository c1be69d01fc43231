"""MadaKV: per-head modality budgets from proxy-token attention (MPA) and layer budgets
compensated in order over the layers (HCC). No merging by default."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from meda_vllm.budgets import HCCState, LayerBudgets, modality_demand
from meda_vllm.policies.base import GetView, Policy, Ranking
from meda_vllm.policies.knobs import knob, number
from meda_vllm.selection import host_values, pool_scores, rank_positions
from meda_vllm.types import LayerView


def modality_quotas(psi: Tensor, vis: Tensor, forced: Tensor, budget: int | Tensor) -> Tensor:
    """``[H_kv]`` visual slots per head beyond the forced ones (the rest is text).

    ``phi_v = w_v / (w_v + w_t) * budget`` counts the forced visual tokens; the quotas
    are then capped by what each modality has left, the overflow going to the other.
    ``forced``: ``[N]`` bool, or ``[H_kv, N]`` with ``budget`` ``[H_kv]`` int64 (a layer
    set: each head with its layer's window and budget). No host synchronisation.
    """
    n = psi.shape[1]
    w_v = (psi * vis).sum(1)
    w_t = (psi * ~vis).sum(1)
    mass = w_v + w_t
    share = torch.where(mass > 0, w_v / mass.clamp_min(1e-30), vis.float().mean().expand_as(w_v))
    phi_v = torch.floor(share.double() * budget + 0.5).long()
    n_forced = forced.sum(-1)
    free = budget - n_forced
    q_v = torch.minimum((phi_v - (vis & forced).sum(-1)).clamp_min(0), free)
    n_cv = (vis & ~forced).sum(-1)
    n_ct = n - n_forced - n_cv
    q_v = torch.minimum(q_v, n_cv)
    return torch.maximum(q_v, free - n_ct)  # text cannot take it all


@dataclass(frozen=True)
class MadaKVPolicy(Policy):
    name = "madakv"

    theta: float = knob(
        0.95, number(0, 1, lo_open=True), "attention mass a layer's demand must cover (HCC)"
    )

    def ranking(self, view: LayerView, budget: int | Sequence[int]) -> Ranking:
        psi = self.raw_score(view)
        score = pool_scores(psi, self.pooling, self.pool_kernel)
        # The protected window: [N], or [H_kv, N] for a layer set (each head its layer's)
        forced = self.tiers(view, budget).to(psi.device) > 0
        if not isinstance(budget, int):  # a layer set: each head with its layer's budget
            heads = view.H_kv // len(budget)
            budget = host_values([b for b in budget for _ in range(heads)], psi.device)
        vis = (
            view.vis.to(psi.device)
            if view.vis is not None
            else torch.zeros(view.N, dtype=torch.bool, device=psi.device)
        )
        q_v = modality_quotas(psi, vis, forced, budget)
        q_t = budget - forced.sum(-1) - q_v
        chosen = torch.zeros(view.H_kv, view.N, dtype=torch.bool, device=psi.device)
        slot = torch.arange(view.N, device=psi.device)[None, :]
        for candidates, quota in ((vis & ~forced, q_v), (~vis & ~forced, q_t)):
            # Candidates of this modality come first in `order`, best first.
            order = rank_positions(score, tiebreak=psi, tier=candidates.to(torch.int64))
            chosen |= torch.zeros_like(chosen).scatter_(1, order, slot < quota[:, None])
        tier = 2 * forced.to(torch.int64) + chosen.to(torch.int64)
        return Ranking(score=score, tiebreak=psi, tier=tier, attention=psi)

    def layer_budgets(
        self, get_view: GetView, num_layers: int, n: int, budget: int
    ) -> LayerBudgets:
        # HCC is sequential: layer l's spend sets what the layers after it can have.
        hcc = HCCState(num_layers, budget, n, self.min_keep)
        for layer in range(num_layers):
            view = get_view(layer)
            demand = modality_demand(self.raw_score(view), view.vis, self.theta)
            hcc.spend(float(demand.double().mean()))
        return LayerBudgets(hcc.budgets)

    def layer_budgets_set(
        self, view: LayerView, num_layers: int, n: int, budget: int
    ) -> LayerBudgets:
        # The demands do not depend on the budgets: all layers' in one pass and one host
        # copy, then the sequential compensation on the host.
        demand = modality_demand(self.raw_score(view), view.vis, self.theta)
        hcc = HCCState(num_layers, budget, n, self.min_keep)
        for mean in demand.view(num_layers, -1).double().mean(1).tolist():
            hcc.spend(float(mean))
        return LayerBudgets(hcc.budgets)
