"""MadaKV: per-head modality preference (MPA) and layer compensation (HCC)."""

from __future__ import annotations

import math

import torch
from _util import make_request

from meda_vllm.compress import compress
from meda_vllm.config import KVPolicyConfig
from meda_vllm.types import LayerView


def _two_head_layer(n, vis, window, seed=0, d=16):
    """KV head 0's window queries look only at image keys, head 1's only at text keys."""
    gen = torch.Generator().manual_seed(seed)
    u_img, u_txt = torch.zeros(d), torch.zeros(d)
    u_img[0], u_txt[1] = 1.0, 1.0
    keys = torch.randn(2, n, d, generator=gen) * 0.3
    keys[:, :, :2] = 0.0
    keys[:, vis, 0] = 4.0 + torch.rand(2, int(vis.sum()), generator=gen)
    keys[:, ~vis, 1] = 4.0 + torch.rand(2, int((~vis).sum()), generator=gen)
    queries = torch.randn(4, n, d, generator=gen) * 0.3
    queries[:2, :, :2] = 0.0
    queries[:2, :, 0] = 6.0  # query heads 0-1 -> KV head 0: image
    queries[2:, :, :2] = 0.0
    queries[2:, :, 1] = 6.0  # query heads 2-3 -> KV head 1: text
    values = torch.randn(2, n, d, generator=gen)
    pos = torch.arange(n - window, n)
    return LayerView(keys, values, queries[:, pos], pos, vis)


def test_head_preferring_images_keeps_only_images():
    n, window = 400, 16
    vis = torch.zeros(n, dtype=torch.bool)
    vis[40:300] = True
    view = _two_head_layer(n, vis, window)
    cfg = KVPolicyConfig(kv_policy="madakv", kv_budget=80, kv_window=window)
    plan = compress(lambda i: view, 1, cfg, n)
    kept = plan.layers[0].kept
    for head, want_vis in ((0, True), (1, False)):
        beyond_window = [p for p in kept[head].tolist() if p < n - window]
        assert len(beyond_window) == 80 - window
        assert all(bool(vis[p]) == want_vis for p in beyond_window), head


def test_hcc_moves_budget_to_complex_layers_and_keeps_total():
    """Sharp layers (attention on a few keys) need little; flat ones need a lot."""
    n, window, layers = 300, 8, 4
    req = make_request(num_layers=layers, heads=4, kv_heads=2, n=n, seed=4)
    # Simple layers: every window query hits two text and two image keys hard (the theta
    # count is per modality, so both modalities must be concentrated to need little).
    for layer in (0, 1):
        k = req.keys[layer]
        direction = torch.randn(16)
        assert not req.vis[[10, 250]].any() and req.vis[[120, 150]].all()
        k[:, [10, 120, 150, 250]] = 5.0 * direction
        req.queries[layer][:, n - window :] = direction
    for layer in (2, 3):  # complex: flat attention
        req.queries[layer].zero_()
    cfg = KVPolicyConfig(kv_policy="madakv", kv_budget=0.25, kv_window=window)
    calls = []

    def get_view(i):
        calls.append(i)
        return req.get_view(cfg)(i)

    plan = compress(get_view, layers, cfg, n)
    s = cfg.budget_tokens(n)
    assert sum(plan.layer_budgets) == layers * s  # total fixed
    assert plan.layer_budgets[0] < s and plan.layer_budgets[1] < s
    assert plan.layer_budgets[2] > s
    assert calls == list(range(layers)) * 2  # HCC pass in layer order, then selection
    # HCC is greedy in layer order: layer 2's demand (~theta of each modality, flat
    # attention) exceeds what is left, so it takes all but layer 3's floor (documented).
    assert plan.layer_budgets[2] <= math.ceil(0.95 * n) + 1
    assert plan.layer_budgets[3] == cfg.kv_min_tokens_per_layer


def test_text_only_request_is_all_text():
    req = make_request(num_layers=2, n=200, vis=None)
    cfg = KVPolicyConfig(kv_policy="madakv", kv_budget=0.2)
    plan = compress(req.get_view(cfg), 2, cfg, 200)
    assert sum(plan.layer_budgets) == 80
    assert all(lp.kept.shape[1] == b for lp, b in zip(plan.layers, plan.layer_budgets, strict=True))


def test_quota_overflow_goes_to_the_other_modality():
    """A head that wants images but has fewer image tokens than its share keeps them all."""
    n, window = 200, 8
    vis = torch.zeros(n, dtype=torch.bool)
    vis[50:60] = True  # only 10 image tokens
    view = _two_head_layer(n, vis, window, seed=1)
    cfg = KVPolicyConfig(kv_policy="madakv", kv_budget=60, kv_window=window)
    plan = compress(lambda i: view, 1, cfg, n)
    kept0 = set(plan.layers[0].kept[0].tolist())
    assert set(range(50, 60)) <= kept0 and len(kept0) == 60
