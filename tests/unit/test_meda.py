"""MEDA: entropy-driven layer budgets, text-only fallback, selection with text prior and
recent window, merging."""

from __future__ import annotations

import torch
from _util import make_request

from meda_vllm.compress import compress
from meda_vllm.config import KVPolicyConfig
from meda_vllm.entropy import cross_modal_entropy_exact
from meda_vllm.merging import merge_evicted


def test_budgets_sum_exactly_and_follow_entropy_override():
    entropy = [2.0, 5.0, 3.0, 4.5, 1.0, 3.5]
    req = make_request(num_layers=6, n=400, kv_heads=2, heads=4)
    cfg = KVPolicyConfig(kv_policy="meda", kv_budget=0.25, kv_window=16)
    calls = []

    def get_view(layer):
        calls.append(layer)
        return req.get_view(cfg, entropy=entropy[layer])(layer)

    plan = compress(get_view, 6, cfg, 400)
    assert plan.entropy == entropy
    assert sum(plan.layer_budgets) == 6 * 100
    ranked = sorted(range(6), key=lambda i: entropy[i])
    assert [plan.layer_budgets[i] for i in ranked] == sorted(plan.layer_budgets)
    assert plan.layer_budgets[1] > 100 > plan.layer_budgets[4]  # spread -> more cache
    assert all(lp.kept.shape[1] == b for lp, b in zip(plan.layers, plan.layer_budgets, strict=True))
    # Two passes, each in layer order: entropy, then selection.
    assert calls == list(range(6)) * 2


def test_budgets_follow_computed_entropy():
    """Layers with flatter attention (small query scale) get more cache."""
    sharp = [3.0, 0.2, 1.5, 0.6]
    req = make_request(num_layers=4, heads=4, kv_heads=2, n=300, sharpness=sharp, seed=1)
    cfg = KVPolicyConfig(kv_policy="meda", kv_budget=0.3, kv_window=16, kv_min_tokens_per_layer=8)
    plan = compress(req.get_view(cfg), 4, cfg, 300)
    exact = [cross_modal_entropy_exact(req.queries[i], req.keys[i], req.vis) for i in range(4)]
    assert sorted(range(4), key=lambda i: exact[i]) == sorted(
        range(4), key=lambda i: plan.entropy[i]
    )
    assert sum(plan.layer_budgets) == 4 * 90
    assert plan.layer_budgets[1] == max(plan.layer_budgets)
    assert plan.layer_budgets[0] == min(plan.layer_budgets)


def test_renormalize_false_lets_the_total_drift():
    req = make_request(num_layers=4, n=200)
    cfg = KVPolicyConfig(kv_policy="meda", kv_budget=0.2, kv_meda_renormalize=False)
    entropy = [9.0, 1.0, 1.0, 1.0]
    plan = compress(lambda i: req.get_view(cfg, entropy=entropy[i])(i), 4, cfg, 200)
    assert plan.layer_budgets[1:] == [16, 16, 16]  # clamped up, not re-normalised
    assert sum(plan.layer_budgets) > 4 * 40


def test_text_only_falls_back_to_uniform():
    req = make_request(num_layers=3, n=200, vis=None)
    cfg = KVPolicyConfig(kv_policy="meda", kv_budget=0.2)
    plan = compress(req.get_view(cfg), 3, cfg, 200)
    assert plan.fallback == "text_only"
    assert plan.entropy is None
    assert plan.layer_budgets == [40, 40, 40]


def test_vision_only_falls_back_to_uniform():
    req = make_request(num_layers=2, n=100, vis=torch.ones(100, dtype=torch.bool))
    cfg = KVPolicyConfig(kv_policy="meda", kv_budget=0.2, kv_window=8)
    plan = compress(req.get_view(cfg), 2, cfg, 100)
    assert plan.fallback == "vision_only" and plan.layer_budgets == [20, 20]


def test_recent_window_and_text_prior():
    n = 400
    vis = torch.zeros(n, dtype=torch.bool)
    vis[20:300] = True  # text 0..19, image 20..299, text 300..399
    req = make_request(num_layers=1, n=n, vis=vis, seed=2)
    cfg = KVPolicyConfig(kv_policy="meda", kv_budget=120, kv_window=16, kv_merge="none")
    plan = compress(lambda i: req.get_view(cfg, entropy=1.0)(i), 1, cfg, n)
    kept = set(plan.layers[0].kept[0].tolist())
    recent = round(0.75 * 120)
    assert set(range(n - recent, n)) <= kept
    # 30 slots left: the 20 text tokens of the prefix + the 10 remaining text tokens first.
    text_outside = [p for p in range(n - recent) if not vis[p]]
    assert set(text_outside) <= kept
    assert len(kept) == 120


def test_recent_fraction_is_a_parameter():
    req = make_request(num_layers=1, n=400, vis=None)
    cfg = KVPolicyConfig(kv_policy="meda", kv_budget=100, kv_window=8, kv_meda_recent_fraction=0.5)
    plan = compress(req.get_view(cfg), 1, cfg, 400)
    kept = plan.layers[0].kept[0].tolist()
    assert kept[-50:] == list(range(350, 400))


def test_merges_by_default():
    req = make_request(num_layers=2, n=200, kv_heads=2, heads=4)
    cfg = KVPolicyConfig(kv_policy="meda", kv_budget=0.2, kv_window=8)
    plan = compress(req.get_view(cfg), 2, cfg, 200)
    for layer, lp in enumerate(plan.layers):
        assert lp.keys is not None
        want_k, want_v = merge_evicted(req.keys[layer], req.values[layer], lp.kept, "average")
        assert torch.equal(lp.keys, want_k) and torch.equal(lp.values, want_v)
    cfg = cfg.merged({"merge": "none"})
    assert all(lp.keys is None for lp in compress(req.get_view(cfg), 2, cfg, 200).layers)


def test_fallback_reads_each_view_twice_only():
    req = make_request(num_layers=3, n=200, vis=None)
    cfg = KVPolicyConfig(kv_policy="meda", kv_budget=0.2)
    compress(req.get_view(cfg), 3, cfg, 200)
    assert req.calls == [0, 1, 2, 0, 1, 2]
