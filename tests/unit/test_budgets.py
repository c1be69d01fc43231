"""Layer budget allocators: exact totals, bounds, order, PyramidKV ramp, HCC recurrence."""

from __future__ import annotations

import math
import random

import pytest
import torch

from meda_vllm.budgets import (
    HCCState,
    entropy_budgets,
    fit_budgets,
    pyramid_budgets,
    theta_count,
)


@pytest.mark.parametrize("seed", range(20))
def test_fit_budgets_exact_total_bounds_and_order(seed):
    rng = random.Random(seed)
    layers = rng.randint(1, 40)
    n = rng.randint(20, 5000)
    budget = rng.randint(1, n)
    lo = rng.randint(1, 64)
    targets = [rng.expovariate(1.0) ** 3 for _ in range(layers)]
    out = fit_budgets(targets, layers * budget, lo, n)
    assert sum(out) == layers * budget
    lo_eff = min(lo, budget)
    assert all(lo_eff <= b <= n for b in out)
    for i in range(layers):
        for j in range(layers):
            if targets[i] > targets[j]:
                assert out[i] >= out[j]


def test_fit_budgets_keeps_ratios_of_free_layers():
    out = fit_budgets([1.0, 2.0, 3.0, 4.0], 1000, 1, 10_000)
    assert out == [100, 200, 300, 400]


def test_fit_budgets_clamps_and_redistributes():
    # The big layer would want 970 of a 100-token prompt: it gets 100, the rest share.
    out = fit_budgets([97.0, 1.0, 1.0, 1.0], 200, 10, 100)
    assert out[0] == 100 and sum(out) == 200 and min(out) >= 10


@pytest.mark.parametrize(("layers", "budget", "n"), [(32, 820, 4097), (28, 20, 100), (4, 5, 40)])
def test_pyramid_ramp(layers, budget, n):
    beta = 20.0
    out = pyramid_budgets(layers, budget, n, beta, min_keep=16)
    assert sum(out) == layers * budget
    assert all(a >= b for a, b in zip(out[:-1], out[1:], strict=True))  # decreasing bottom to top
    lo = min(16, budget)
    assert all(lo <= b <= n for b in out)
    s_min = budget / beta
    s_max = 2 * budget - s_min
    if s_max <= n and s_min >= 16:  # nothing clamped: the paper's ramp, up to rounding
        want = [s_max - (s_max - s_min) * i / (layers - 1) for i in range(layers)]
        assert all(abs(a - b) < 1 for a, b in zip(out, want, strict=True))


def test_pyramid_single_layer():
    assert pyramid_budgets(1, 37, 100, 20.0, 16) == [37]


def test_entropy_budgets_follow_softmax_and_sum_exactly():
    entropy = [3.0, 1.0, 2.0, 2.5, 0.5]
    out = entropy_budgets(entropy, budget=100, n=1000, min_keep=16)
    assert sum(out) == 500
    order = sorted(range(5), key=lambda i: entropy[i])
    assert [out[i] for i in order] == sorted(out)
    w = torch.softmax(torch.tensor(entropy, dtype=torch.float64), 0) * 500
    clamped = [max(16.0, float(x)) for x in w]
    # Only the clamped-to-min layers deviate from the softmax; free ones keep their ratios.
    free = [i for i in range(5) if w[i] > 16]
    scale = out[free[0]] / float(w[free[0]])
    for i in free:
        assert abs(out[i] - scale * float(w[i])) <= 1
    assert all(out[i] >= 16 for i in range(5)) and clamped


def test_entropy_budgets_renormalize_false_is_clamp_of_round():
    entropy = [5.0, 1.0, 1.0, 1.0]
    out = entropy_budgets(entropy, budget=50, n=120, min_keep=16, renormalize=False)
    w = torch.softmax(torch.tensor(entropy, dtype=torch.float64), 0) * 200
    assert out == [min(120, max(16, math.floor(float(x) + 0.5))) for x in w]
    assert sum(out) != 200  # the published behaviour: the total drifts


def test_entropy_budgets_below_min_keep_are_uniform():
    assert entropy_budgets([1.0, 9.0, 3.0], budget=8, n=100, min_keep=16) == [8, 8, 8]


def test_theta_count_is_minimal():
    gen = torch.Generator().manual_seed(0)
    mass = torch.rand(6, 200, generator=gen) ** 4
    for theta in (0.5, 0.95, 1.0):
        k = theta_count(mass, theta)
        top = torch.sort(mass.double(), 1, descending=True).values.cumsum(1)
        total = top[:, -1]
        for h in range(6):
            assert top[h, k[h] - 1] >= theta * total[h] * (1 - 1e-9)
            if k[h] > 1:
                assert top[h, k[h] - 2] < theta * total[h]


def test_theta_count_of_zero_mass_is_zero():
    assert theta_count(torch.zeros(2, 5), 0.9).tolist() == [0, 0]
    assert theta_count(torch.zeros(2, 0), 0.9).tolist() == [0, 0]


def test_hcc_recurrence_and_total():
    layers, budget, n, h_kv = 4, 50, 200, 2
    hcc = HCCState(layers, budget, n, min_keep=4)
    demands = [10.0, 10.0, 90.0, 90.0]
    phi = float(budget)
    for layer, demand in enumerate(demands):
        assert math.isclose(hcc.phi, phi)
        spent = hcc.spend(demand)
        if layer < layers - 1:
            assert spent == round(demand)
            # phi_{l+1} = phi_l - K_l / (H_kv (L - l)), l 1-based, K_l = sum_h (demand - phi_l)
            k_l = h_kv * (demand - phi)
            phi = phi - k_l / (h_kv * (layers - (layer + 1)))
    assert sum(hcc.budgets) == layers * budget
    assert hcc.budgets[:3] == [10, 10, 90] and hcc.budgets[3] == 90


def test_hcc_clamps_keep_later_layers_feasible():
    hcc = HCCState(4, 50, 200, min_keep=16)
    first = hcc.spend(1000.0)  # wants everything
    assert first == 200 - 3 * 16
    rest = [hcc.spend(0.0) for _ in range(3)]
    assert rest[:2] == [16, 16] and sum([first, *rest]) == 200
    with pytest.raises(RuntimeError):
        hcc.spend(1.0)
