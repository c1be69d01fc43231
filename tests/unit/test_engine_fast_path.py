"""The serving engine's fast path feeds the core precomputed window scores and entropies
from the paged kernels (``LayerView.window_scores`` / ``.entropy``), the way
``meda_vllm.vllm_adapter.worker`` does on GPU. The plans must be the same as when the core
computes everything from dense K/V itself."""

from __future__ import annotations

import pytest
import torch

from meda_vllm import paged_view
from meda_vllm.compress import compress, required_query_positions
from meda_vllm.config import KVPolicyConfig
from meda_vllm.policies import build_policy
from meda_vllm.selection import rows_for_positions
from meda_vllm.testing.synthetic import paged_request
from meda_vllm.types import LayerView


@pytest.mark.parametrize("policy", ["snapkv", "pyramidkv", "meda", "madakv", "h2o", "lookm"])
def test_paged_overrides_give_the_core_plan(policy, monkeypatch):
    """``paged_layer_view(fast=True)`` (the worker's GPU path: lazy scores, entropy and
    merging from the paged ops, no dense K/V) plans exactly what the dense path plans."""
    n, layers, h, h_kv, d, bs = 300, 3, 4, 2, 16, 32
    req = paged_request(n, layers, h_kv, d, bs, layout="cpu_vec", seed=7)
    layout, row, caches, vis = req.layouts[0], req.row, req.caches, req.vis
    cfg = KVPolicyConfig.from_mapping({"kv_policy": policy, "kv_budget": 0.25, "kv_window": 16})
    if policy == "lookm":
        cfg = cfg.merged({"kv_merge": "weighted"})
    pos = required_query_positions(cfg, n, vis)
    score_sel = torch.nonzero(pos >= n - cfg.policy.score_rows(n)).squeeze(1)
    ent_sel = None
    if policy == "meda":
        ent_pos = build_policy(cfg).entropy_positions(n, vis)
        ent_sel = rows_for_positions(pos, ent_pos)
    gathers = []
    real_gather = paged_view.gather_kv
    monkeypatch.setattr(
        paged_view, "gather_kv", lambda *a, **k: gathers.append(1) or real_gather(*a, **k)
    )

    queries = req.query_rows(h, pos)

    def view(layer: int, fast: bool) -> LayerView:
        q = queries[layer]
        return paged_view.paged_layer_view(
            caches[layer], layout, row, n, q, pos, vis, fast=fast,
            score_sel=score_sel, entropy_sel=ent_sel,
        )  # fmt: skip

    slow = compress(lambda i: view(i, False), layers, cfg, n, pad_to="max")
    dense_gathers = len(gathers)
    fast = compress(lambda i: view(i, True), layers, cfg, n, pad_to="max")
    assert dense_gathers > 0 and len(gathers) == dense_gathers  # fast: no dense K/V copy
    assert slow is not None and fast is not None
    assert slow.layer_budgets == fast.layer_budgets
    if policy == "meda":
        assert fast.entropy == pytest.approx(slow.entropy, rel=1e-4)
    merged = 0
    for a, b in zip(slow.layers, fast.layers, strict=True):
        assert torch.equal(a.kept, b.kept)
        assert (a.keys is None) == (b.keys is None)
        if a.keys is not None:
            merged += 1
            torch.testing.assert_close(a.keys, b.keys, rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(a.values, b.values, rtol=1e-5, atol=1e-5)
    assert merged == (layers if policy in ("meda", "lookm") else 0)


def test_plan_checks_the_query_positions_once_per_request():
    """On a GPU the views skip value checks (each would synchronise); the plan checks the
    positions once, on the host."""
    req = paged_request(100, 2, 2, 16, 32, layout="cpu_vec")
    cfg = KVPolicyConfig.from_mapping({"kv_policy": "snapkv", "kv_budget": 0.3, "kv_window": 8})
    pos = torch.arange(92, 100).flip(0)  # descending
    rows = req.query_rows(4, pos)
    with pytest.raises(ValueError, match="strictly ascending"):
        paged_view.plan_paged_request(
            req.caches, req.layouts, req.row, 100, rows.__getitem__, pos, req.vis, cfg, fast=True
        )
