"""MEDA's cross-modal entropy: the sampled estimate against the brute-force value.

Tested tolerances (docs/ALGORITHM_CHOICES.md, measured by benchmarks/entropy_sample.py):
with the default sample (text rows in the window + every 8th visual row),
|E_sampled - E_exact| <= 5% of E_exact when rows of a modality are alike, <= 15% when
their sharpness varies row to row (temperature drawn from U[0.25, 1.75]), at N = 480 and
at N = 2400 with the visual rows capped at 32 (``kv_meda_visual_rows``, the stride grows).
Layers whose exact entropies differ by more than twice the tolerance keep their order.
"""

from __future__ import annotations

import math

import pytest
import torch
from _util import entropy_request, make_request

from meda_vllm.entropy import cross_modal_entropy, cross_modal_entropy_exact, layer_entropy
from meda_vllm.modality import entropy_query_positions

TOL_HOMOGENEOUS = 0.05
TOL_HETEROGENEOUS = 0.15


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("group", [1, 4])
def test_all_rows_equal_exact(causal, group):
    req = make_request(num_layers=1, heads=2 * group, kv_heads=2, n=60, seed=group)
    pos = torch.arange(60)
    got = cross_modal_entropy(req.queries[0], pos, req.keys[0], req.vis, causal=causal)
    want = cross_modal_entropy_exact(req.queries[0], req.keys[0], req.vis, causal=causal)
    assert math.isclose(got, want, rel_tol=1e-5)


def test_uniform_attention_has_maximal_entropy():
    req = make_request(num_layers=1, n=50)
    q = torch.zeros_like(req.queries[0])
    n_v = int(req.vis.sum())
    want = math.log(n_v) + math.log(50 - n_v)
    assert math.isclose(cross_modal_entropy_exact(q, req.keys[0], req.vis), want, rel_tol=1e-9)
    got = cross_modal_entropy(q, torch.arange(50), req.keys[0], req.vis)
    assert math.isclose(got, want, rel_tol=1e-5)


def test_single_modality_is_nan():
    req = make_request(num_layers=1, n=30, vis=None)
    vis = torch.zeros(30, dtype=torch.bool)
    assert math.isnan(cross_modal_entropy(req.queries[0], torch.arange(30), req.keys[0], vis))
    assert math.isnan(cross_modal_entropy_exact(req.queries[0], req.keys[0], ~vis))
    view = req.view(0, torch.arange(30))
    assert math.isnan(layer_entropy(view, 8, 8, False))


def test_override_is_used():
    req = make_request(num_layers=1, n=40)
    view = req.view(0, torch.arange(36, 40), entropy=1.25)  # too few rows to compute it
    assert layer_entropy(view, 4, 8, False) == 1.25


# (N, most visual rows): the stride alone (36 visual rows), and a cap that raises the
# stride from 8 to 45 (32 visual rows out of 1440), as the default cap (128) does past
# 1024 visual tokens
@pytest.mark.parametrize(("n", "visual_rows"), [(480, 0), (2400, 32)])
@pytest.mark.parametrize("heterogeneous", [False, True])
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("seed", [0, 1])
def test_sampled_entropy_tracks_exact(heterogeneous, causal, seed, n, visual_rows):
    req = entropy_request(seed, heterogeneous, n)
    tol = TOL_HETEROGENEOUS if heterogeneous else TOL_HOMOGENEOUS
    window, stride = 32, 8
    pos = entropy_query_positions(req.n, req.vis, window, stride, visual_rows)
    assert pos.numel() < req.n / 4  # the sample is a small fraction of the rows
    if visual_rows:
        assert int(req.vis[pos].sum()) <= visual_rows
    exact, sampled = [], []
    for layer in range(5):
        exact.append(
            cross_modal_entropy_exact(req.queries[layer], req.keys[layer], req.vis, causal=causal)
        )
        sampled.append(layer_entropy(req.view(layer, pos), window, stride, causal, visual_rows))
        assert abs(sampled[-1] - exact[-1]) <= tol * exact[-1], (layer, sampled, exact)
    for i in range(5):
        for j in range(5):
            if exact[i] > exact[j] * (1 + 2 * tol):
                assert sampled[i] > sampled[j]
