"""Layer sets in the planner: ``plan_paged_request(fast=True)`` ranks, merges and compacts
all layers at once (one view stacking every layer's KV heads, one budget per layer). The
plan must be exactly the per-layer plan and the dense (CPU path) plan, for every policy,
with uniform and per-layer budgets."""

from __future__ import annotations

import pytest
import torch

from meda_vllm.compress import required_query_positions
from meda_vllm.config import KVPolicyConfig
from meda_vllm.paged_view import apply_plan, paged_layer_view, plan_paged_request
from meda_vllm.policies import build_policy
from meda_vllm.testing.synthetic import paged_request

POLICIES = ["snapkv", "pyramidkv", "meda", "madakv", "h2o", "lookm", "streamingllm"]


def _plan(req, cfg, heads, **kw):
    pos = required_query_positions(cfg, req.n, req.vis)
    rows = req.query_rows(heads, pos)
    return plan_paged_request(
        req.caches, req.layouts, req.row, req.n, rows.__getitem__, pos, req.vis, cfg, **kw
    )


def _request(layout):
    return paged_request(260, 4, 2, 16, 16, layout=layout, seed=11)


@pytest.mark.parametrize("layout", ["nhd", "cpu_vec"])
@pytest.mark.parametrize("policy", POLICIES)
def test_layer_set_plan_is_the_per_layer_plan(policy, layout, monkeypatch):
    monkeypatch.setenv("MEDA_KERNELS", "torch")
    extra = {"kv_merge": "weighted"} if policy == "meda" else {}
    cfg = KVPolicyConfig.from_mapping(
        {"kv_policy": policy, "kv_budget": 0.3, "kv_window": 16, **extra}
    )
    req = _request(layout)
    dense = _plan(req, cfg, 4, fast=False)
    per_layer = _plan(req, cfg, 4, fast=True, layer_sets=False)
    as_set = _plan(req, cfg, 4, fast=True)
    assert dense.layer_set is None and per_layer.layer_set is None
    assert (as_set.layer_set is not None) == build_policy(cfg).takes_layer_sets
    if policy in ("pyramidkv", "meda"):  # per-layer budgets: tiers differ between layers
        assert len(set(as_set.layer_budgets)) > 1
    for other in (dense, per_layer):
        assert as_set.layer_budgets == other.layer_budgets
        assert as_set.fallback == other.fallback
        for a, b in zip(other.layers, as_set.layers, strict=True):
            assert a.budget == b.budget
            assert torch.equal(a.kept, b.kept)
            assert (a.keys is None) == (b.keys is None)
            if a.keys is not None:
                torch.testing.assert_close(b.keys, a.keys, rtol=1e-5, atol=1e-5)
                torch.testing.assert_close(b.values, a.values, rtol=1e-5, atol=1e-5)
    if as_set.layer_set is not None:  # one compaction for all layers == layer by layer
        twin = _request(layout)
        apply_plan(req.caches, req.layouts, req.row, as_set)
        apply_plan(twin.caches, twin.layouts, twin.row, per_layer)
        for x, y in zip(req.caches, twin.caches, strict=True):
            torch.testing.assert_close(x, y, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("policy", ["snapkv", "meda", "h2o", "lookm", "streamingllm"])
def test_set_tiers_are_each_layers_tiers(policy):
    """``tiers(view, [b_0, .., b_L-1])`` gives every head its own layer's tiers."""
    req = _request("nhd")
    cfg = KVPolicyConfig.from_mapping({"kv_policy": policy, "kv_budget": 0.3, "kv_window": 16})
    pol = build_policy(cfg)
    n, budgets = req.n, [5, 40, 78, 200]
    pos = torch.arange(n - 16, n)
    q = torch.randn(4 * 4, 16, 16)
    view = paged_layer_view(req.caches, req.layouts[0], req.row, n, q, pos, req.vis, fast=True)
    assert view.H_kv == 4 * 2
    got = pol.tiers(view, budgets)
    assert got.shape == (8, n)
    one = paged_layer_view(
        req.caches[0], req.layouts[0], req.row, n, q[:4], pos, req.vis, fast=True
    )
    for layer, b in enumerate(budgets):
        want = pol.tiers(one, b)
        for head in range(2):
            # same order (values may be scaled: only the order of tiers matters)
            row = got[layer * 2 + head]
            assert torch.equal(torch.argsort(row, stable=True), torch.argsort(want, stable=True))
            assert torch.equal(row == row.max(), want == want.max())


@pytest.mark.parametrize("policy", POLICIES)
def test_layer_set_plan_builds_no_per_layer_view(policy, monkeypatch):
    """Budgets (MEDA's entropies, MadaKV's demands), ranking and merging all read the one
    view of the layer set: no per-layer view is built (host time per layer on a GPU)."""
    import meda_vllm.paged_view as pv

    monkeypatch.setenv("MEDA_KERNELS", "torch")
    built = []
    real = pv.paged_layer_view
    monkeypatch.setattr(
        pv, "paged_layer_view", lambda cache, *a, **k: built.append(cache) or real(cache, *a, **k)
    )
    cfg = KVPolicyConfig.from_mapping({"kv_policy": policy, "kv_budget": 0.3, "kv_window": 16})
    plan = _plan(_request("nhd"), cfg, 4, fast=True)
    assert plan is not None and plan.layer_set is not None
    assert len(built) == 1 and isinstance(built[0], list) and len(built[0]) == 4


@pytest.mark.parametrize("modality", ["text_only", "all_visual"])
@pytest.mark.parametrize("policy", ["meda", "madakv", "lookm"])
def test_layer_set_plan_without_cross_modal_rows(policy, modality, monkeypatch):
    """Text-only and vision-only prompts (MEDA falls back to uniform budgets) plan the
    same on a layer set as layer by layer and as the dense path."""
    monkeypatch.setenv("MEDA_KERNELS", "torch")
    req = _request("nhd")
    req.vis = None if modality == "text_only" else torch.ones(req.n, dtype=torch.bool)
    cfg = KVPolicyConfig.from_mapping({"kv_policy": policy, "kv_budget": 0.3, "kv_window": 16})
    plans = [
        _plan(req, cfg, 4, fast=False),
        _plan(req, cfg, 4, fast=True, layer_sets=False),
        _plan(req, cfg, 4, fast=True),
    ]
    assert plans[2].layer_set is not None
    for other in plans[:2]:
        assert other.layer_budgets == plans[2].layer_budgets
        assert other.fallback == plans[2].fallback
        for a, b in zip(other.layers, plans[2].layers, strict=True):
            assert torch.equal(a.kept, b.kept)


def test_layers_of_different_layouts_are_planned_one_by_one(monkeypatch):
    """A model whose layers differ (e.g. another head count or dtype per layer) cannot be
    one cache set: the planner falls back to layer by layer."""
    monkeypatch.setenv("MEDA_KERNELS", "torch")
    req = _request("nhd")
    req.caches[1] = req.caches[1].double().float().clone()  # same values, own strides
    req.caches[1] = req.caches[1].contiguous()  # [nb, H, bs, 2D]: another layout
    req.layouts[1] = type(req.layouts[1]).from_logical(req.caches[1])
    cfg = KVPolicyConfig.from_mapping({"kv_policy": "snapkv", "kv_budget": 0.3, "kv_window": 16})
    mixed = _plan(req, cfg, 4, fast=True)
    assert mixed.layer_set is None
    same = _plan(_request("nhd"), cfg, 4, fast=True)
    assert same.layer_set is not None
    for a, b in zip(mixed.layers, same.layers, strict=True):
        assert torch.equal(a.kept, b.kept)


# ---- a bounded workspace: layer chunks -------------------------------------------------------


def _geometry(req, cfg, monkeypatch):
    """The per-layer cost arguments plan_paged_request uses for this request."""
    import meda_vllm.paged_view as pv

    seen = []
    real = pv.layer_cost
    monkeypatch.setattr(pv, "layer_cost", lambda n, p, **kw: seen.append(kw) or real(n, p, **kw))
    plan = _plan(req, cfg, 4, fast=True, workspace=1 << 40)
    monkeypatch.setattr(pv, "layer_cost", real)
    geometry = dict(seen[0])
    geometry.pop("merged_retained")
    return plan, geometry


def _workspace_for(req, plan, geometry, chunk):
    """Bytes that fit exactly ``chunk`` layers at this plan's physical length."""
    from meda_vllm.workspace import layer_cost

    cost = layer_cost(req.n, plan.kept_tokens, **geometry)
    return cost.chunk_bytes(len(req.caches), chunk)


@pytest.mark.parametrize("policy", POLICIES)
def test_chunked_plan_is_the_unchunked_plan(policy, monkeypatch):
    """A workspace for 1, 2 or 3 of the 4 layers: chunks of that many layers, the same
    budgets, kept positions and merged entries, and the same caches after compaction."""
    monkeypatch.setenv("MEDA_KERNELS", "torch")
    extra = {"kv_merge": "weighted"} if policy == "meda" else {}
    cfg = KVPolicyConfig.from_mapping(
        {"kv_policy": policy, "kv_budget": 0.3, "kv_window": 16, **extra}
    )
    req = _request("nhd")
    whole, geometry = _geometry(req, cfg, monkeypatch)
    assert whole.chunks is None and whole.layer_set is not None  # everything fits: one set
    sizes = {}
    for chunk in (1, 2, 3):
        req = _request("nhd")
        ws = _workspace_for(req, whole, geometry, chunk)
        plan = _plan(req, cfg, 4, fast=True, workspace=ws)
        assert plan.chunks is not None and plan.layer_set is None
        sizes[chunk] = [hi - lo for lo, hi, _ in plan.chunks]
        assert plan.layer_budgets == whole.layer_budgets
        assert plan.fallback == whole.fallback and plan.entropy == whole.entropy
        for a, b in zip(whole.layers, plan.layers, strict=True):
            assert a.budget == b.budget
            assert torch.equal(a.kept, b.kept)
        for lo, hi, part in plan.chunks:
            keys, values = part.merged()
            assert (keys is None) == (whole.layer_set.keys is None)
            if keys is not None:
                h = whole.layer_set.kept.shape[0] // 4
                torch.testing.assert_close(keys, whole.layer_set.keys[lo * h : hi * h])
                torch.testing.assert_close(values, whole.layer_set.values[lo * h : hi * h])
        twin = _request("nhd")
        apply_plan(req.caches, req.layouts, req.row, plan)
        apply_plan(twin.caches, twin.layouts, twin.row, whole)
        for x, y in zip(req.caches, twin.caches, strict=True):
            torch.testing.assert_close(x, y, rtol=0, atol=0)
    # a smaller workspace: more, smaller chunks
    assert sizes == {1: [1, 1, 1, 1], 2: [2, 2], 3: [3, 1]}


@pytest.mark.parametrize("fast", [True, False])
def test_workspace_too_small_for_one_layer(fast, monkeypatch):
    from meda_vllm.workspace import WorkspaceTooSmall

    monkeypatch.setenv("MEDA_KERNELS", "torch")
    cfg = KVPolicyConfig.from_mapping({"kv_policy": "meda", "kv_budget": 0.3, "kv_window": 16})
    req = _request("nhd")
    with pytest.raises(WorkspaceTooSmall, match="kv_workspace_bytes is 4096"):
        _plan(req, cfg, 4, fast=fast, workspace=4096)
    assert _plan(req, cfg, 4, fast=fast, workspace=1 << 30) is not None
