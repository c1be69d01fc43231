"""Layer budget allocators: uniform, PyramidKV, MEDA entropy, MadaKV compensation (HCC).

Every allocator returns integers in ``[lo, N]`` whose sum is exactly ``L * S`` (the mean
budget times the number of layers), except MEDA with ``renormalize=False``, which
reproduces the published code (clamp, no re-normalisation).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass(frozen=True)
class LayerBudgets:
    budgets: list[int]
    entropy: list[float] | None = None
    fallback: str | None = None


def effective_min(min_keep: int, total: int, num_layers: int) -> int:
    """The per-layer floor, lowered when the mean budget itself is below it."""
    return max(0, min(min_keep, total // num_layers))


def uniform_budgets(num_layers: int, budget: int) -> list[int]:
    return [budget] * num_layers


def fit_budgets(targets: Sequence[float], total: int, lo: int, hi: int) -> list[int]:
    """Integers ``S_l`` in ``[lo, hi]`` with ``sum == total``, proportional to ``targets``.

    Finds the scale ``c`` with ``sum clamp(c * t_l, lo, hi) == total`` (bisection; the
    clamped layers stay clamped, the free ones keep their ratios), then rounds by largest
    remainder (ties to the lower layer). The result is monotone in ``targets``: a larger
    target never gets a smaller budget.
    """
    n_layers = len(targets)
    if n_layers == 0:
        return []
    lo = min(lo, total // n_layers)
    hi = max(hi, -(-total // n_layers))
    x = [max(0.0, float(t)) if math.isfinite(float(t)) else 0.0 for t in targets]
    peak = max(x)
    # Underflowed softmax weights must still be able to grow, or the bisection cannot close.
    x = [1.0] * n_layers if peak <= 0 else [xi + 1e-12 * peak for xi in x]

    def filled(c: float) -> float:
        return sum(min(hi, max(lo, c * xi)) for xi in x)

    c_lo, c_hi = 0.0, 1.0
    while filled(c_hi) < total:
        c_hi *= 2.0
    for _ in range(200):
        mid = 0.5 * (c_lo + c_hi)
        if filled(mid) < total:
            c_lo = mid
        else:
            c_hi = mid
    real = [min(hi, max(lo, c_hi * xi)) for xi in x]
    out = [min(hi, max(lo, math.floor(r))) for r in real]
    frac = [r - math.floor(r) for r in real]
    rest = total - sum(out)
    # Largest remainder first; ties go to the lower layer index.
    by_frac_desc = sorted(range(n_layers), key=lambda i: (-frac[i], i))
    while rest > 0:
        moved = False
        for i in by_frac_desc:
            if rest == 0:
                break
            if out[i] < hi:
                out[i] += 1
                rest -= 1
                moved = True
        if not moved:
            raise RuntimeError("budget allocation cannot reach its total")
    by_frac_asc = sorted(range(n_layers), key=lambda i: (frac[i], -i))
    while rest < 0:
        moved = False
        for i in by_frac_asc:
            if rest == 0:
                break
            if out[i] > lo:
                out[i] -= 1
                rest += 1
                moved = True
        if not moved:
            raise RuntimeError("budget allocation cannot reach its total")
    return out


def pyramid_budgets(num_layers: int, budget: int, n: int, beta: float, min_keep: int) -> list[int]:
    """PyramidKV: linear from ``S_max = 2S - S/beta`` (bottom) to ``S_min = S/beta`` (top).

    The real-valued ramp already sums to ``L * S``; clamping to ``[min_keep, N]`` and
    integer rounding go through ``fit_budgets`` so the sum stays exact.
    """
    if num_layers == 1:
        return [budget]
    s_min = budget / beta
    s_max = 2 * budget - s_min
    ramp = [s_max - (s_max - s_min) * layer / (num_layers - 1) for layer in range(num_layers)]
    total = num_layers * budget
    return fit_budgets(ramp, total, effective_min(min_keep, total, num_layers), n)


def entropy_budgets(
    entropy: Sequence[float],
    budget: int,
    n: int,
    min_keep: int,
    *,
    renormalize: bool = True,
) -> list[int]:
    """MEDA: ``S_l ~ softmax_l(E) * L * S``, clamped to ``[min_keep, N]``.

    ``renormalize=True`` re-normalises so that ``sum S_l == L * S`` exactly; ``False``
    rounds and clamps only, as the published code does (the sum then drifts).
    """
    num_layers = len(entropy)
    total = num_layers * budget
    weights = torch.softmax(torch.tensor(list(entropy), dtype=torch.float64), dim=0)
    targets = (weights * total).tolist()
    lo = effective_min(min_keep, total, num_layers)
    if renormalize:
        return fit_budgets(targets, total, lo, n)
    return [min(n, max(lo, math.floor(t + 0.5))) for t in targets]


def theta_count(mass: Tensor, theta: float) -> Tensor:
    """Per row, the fewest entries whose sum reaches ``theta`` of the row's total (0 if none).

    ``mass``: ``[H, M]`` non-negative.
    """
    if mass.shape[1] == 0:
        return torch.zeros(mass.shape[0], dtype=torch.long, device=mass.device)
    sorted_mass = torch.sort(mass.double(), dim=1, descending=True).values
    cum = sorted_mass.cumsum(dim=1)
    target = theta * cum[:, -1:]
    # Tolerate rounding in the cumulative sum so theta = 1 does not overshoot by one.
    reached = cum >= target * (1 - 1e-12)
    count = reached.double().argmax(dim=1) + 1
    return torch.where(cum[:, -1] > 0, count, torch.zeros_like(count))


def modality_demand(psi: Tensor, vis: Tensor | None, theta: float) -> Tensor:
    """MadaKV: per KV head, ``k_v + k_t`` (fewest tokens reaching ``theta`` of each modality's
    psi-mass). ``psi``: ``[H_kv, N]``. With no visual tokens everything is text."""
    if vis is None:
        return theta_count(psi, theta)
    vis = vis.to(psi.device)
    return theta_count(psi[:, vis], theta) + theta_count(psi[:, ~vis], theta)


class HCCState:
    """MadaKV's Hierarchical Compression Compensation, one layer at a time.

    The base budget of the next layer is ``phi_{l+1} = phi_l - K_l / (H_kv * (L - l))``
    (``l`` 1-based), with ``K_l = sum_h (k_v + k_t - phi_l)``: layer ``l`` keeps its mean
    demand and the layers after it share what is left. Carried as the remaining total,
    which is the same recurrence in exact integers: ``phi_l = remaining / layers_left``.
    Each layer's spend is clamped to ``[lo, N]`` and to what keeps the remaining layers
    feasible; the last layer takes the exact remainder, so ``sum == L * S``.
    """

    def __init__(self, num_layers: int, budget: int, n: int, min_keep: int) -> None:
        self.num_layers = num_layers
        self.n = n
        self.total = num_layers * budget
        self.lo = effective_min(min_keep, self.total, num_layers)
        self.remaining = self.total
        self.layer = 0
        self.budgets: list[int] = []

    @property
    def phi(self) -> float:
        """Base budget of the current layer (the target before compensation)."""
        return self.remaining / (self.num_layers - self.layer)

    def spend(self, demand: float) -> int:
        """Record the current layer's mean per-head demand; return its budget ``S_l``."""
        if self.layer >= self.num_layers:
            raise RuntimeError("HCC already allocated every layer")
        after = self.num_layers - self.layer - 1
        floor_ = max(self.lo, self.remaining - after * self.n)
        ceil_ = min(self.n, self.remaining - after * self.lo)
        spent = min(ceil_, max(floor_, math.floor(demand + 0.5)))
        if after == 0:
            spent = self.remaining  # the last layer closes the books
        self.budgets.append(spent)
        self.remaining -= spent
        self.layer += 1
        return spent
