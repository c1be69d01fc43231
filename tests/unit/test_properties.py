"""The correctness properties of ALGORITHMS.md, for every policy, over GQA ratios 1/4/7,
fp32 and bf16, and ragged prompt lengths (1, window - 1, window, 4097)."""

from __future__ import annotations

import pytest
import torch
from _util import (
    ATTENTION_POLICIES,
    EVICTING_POLICIES,
    apply_layer_plan,
    decode_attention,
    make_request,
)

from meda_vllm.compress import compress
from meda_vllm.config import KVPolicyConfig

WINDOW = 32
LENGTHS = [1, WINDOW - 1, WINDOW, 4097]
NUM_LAYERS = 3


def _request(n, group, dtype, needle=None, seed=0):
    # N = 4097 only with one KV head; short prompts with two.
    kv_heads = 1 if n > 1000 else 2
    return make_request(
        num_layers=NUM_LAYERS,
        heads=kv_heads * group,
        kv_heads=kv_heads,
        n=n,
        dtype=dtype,
        needle=needle,
        window=WINDOW,
        seed=seed,
    )


def _check_plan(plan, req, cfg, n):
    budget = cfg.budget_tokens(n)
    if plan is None:
        assert budget >= n or not cfg.evicts
        return
    assert budget < n
    assert plan.n_tokens == n  # decoding continues from the logical length
    assert plan.policy == cfg.kv_policy
    assert len(plan.layers) == len(plan.layer_budgets) == NUM_LAYERS
    # The budget is the mean over layers, exactly.
    assert sum(plan.layer_budgets) == NUM_LAYERS * budget
    for layer, lp in enumerate(plan.layers):
        h_kv = req.keys[layer].shape[0]
        s_l = plan.layer_budgets[layer]
        assert lp.budget == s_l
        # Exactly the budget per (layer, KV head), or everything when it covers the prompt.
        assert lp.kept.shape == (h_kv, min(s_l, n))
        assert lp.kept.dtype == torch.long
        # Original positions, strictly ascending, in range.
        assert bool((lp.kept[:, 1:] > lp.kept[:, :-1]).all())
        assert int(lp.kept.min()) >= 0 and int(lp.kept.max()) < n
        # The last token and the observation window are always kept.
        protected = torch.arange(n - min(WINDOW, s_l, n), n)
        assert bool(torch.isin(protected, lp.kept).all()), (layer, s_l)
        assert bool((lp.kept[:, -1] == n - 1).all())
        # Merged entries have the cache's dtype and shape, or are absent.
        if lp.keys is not None:
            assert lp.keys.shape == (h_kv, lp.kept.shape[1], req.keys[layer].shape[2])
            assert lp.keys.dtype == req.keys[layer].dtype
            assert lp.values.dtype == req.values[layer].dtype
            assert bool(torch.isfinite(lp.keys.float()).all())
        else:
            assert lp.values is None


@pytest.mark.parametrize("n", LENGTHS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("group", [1, 4, 7])
@pytest.mark.parametrize("policy", EVICTING_POLICIES)
def test_plan_properties(policy, group, dtype, n):
    needle = n // 20 if n > 1000 else None  # in the text prefix
    req = _request(n, group, dtype, needle=needle)
    cfg = KVPolicyConfig(kv_policy=policy, kv_window=WINDOW)
    plan = compress(req.get_view(cfg), NUM_LAYERS, cfg, n)
    _check_plan(plan, req, cfg, n)
    if n == 1:
        assert plan is None
    if needle is not None and policy in ATTENTION_POLICIES:
        for layer, lp in enumerate(plan.layers):
            # A planted needle survives wherever the budget has room beyond the window.
            if plan.layer_budgets[layer] > 2 * WINDOW:
                assert bool((lp.kept == needle).any(1).all()), (layer, plan.layer_budgets)


@pytest.mark.parametrize("policy", ("none", "full", *EVICTING_POLICIES))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_ratio_one_is_uncompressed(policy, dtype):
    req = _request(200, 4, dtype)
    cfg = KVPolicyConfig(kv_policy=policy, kv_budget=1.0)
    assert compress(req.get_view(cfg), NUM_LAYERS, cfg, req.n) is None
    assert req.calls == []  # not even a view was read


@pytest.mark.parametrize("policy", EVICTING_POLICIES)
def test_identity_plan_is_bit_identical(policy):
    """Padding every layer to N gives the identity: the decode output does not change."""
    req = _request(150, 4, torch.bfloat16)
    cfg = KVPolicyConfig(kv_policy=policy, kv_window=WINDOW, kv_budget=0.5)
    plan = compress(req.get_view(cfg), NUM_LAYERS, cfg, req.n, pad_to=req.n)
    q = torch.randn(8, 16).to(torch.bfloat16)
    for layer, lp in enumerate(plan.layers):
        assert torch.equal(lp.kept, torch.arange(req.n).expand_as(lp.kept))
        assert lp.keys is None and lp.values is None
        k, v = apply_layer_plan(req.keys[layer], req.values[layer], lp)
        full = decode_attention(q, req.keys[layer], req.values[layer])
        assert torch.equal(decode_attention(q, k, v), full)


@pytest.mark.parametrize("policy", EVICTING_POLICIES)
def test_kept_entries_are_the_original_ones(policy):
    """Without merging, the compacted cache holds the original K/V at the kept positions."""
    req = _request(300, 4, torch.float32)
    cfg = KVPolicyConfig(kv_policy=policy, kv_merge="none", kv_window=16)
    plan = compress(req.get_view(cfg), NUM_LAYERS, cfg, req.n)
    for layer, lp in enumerate(plan.layers):
        assert lp.keys is None
        k, _ = apply_layer_plan(req.keys[layer], req.values[layer], lp)
        for h in range(k.shape[0]):
            assert torch.equal(k[h], req.keys[layer][h, lp.kept[h]])


@pytest.mark.parametrize("policy", ATTENTION_POLICIES)
@pytest.mark.parametrize("where", ["text", "image"])
def test_needle_is_kept(policy, where):
    """Needle among text, or among image tokens with few text tokens competing for MEDA's
    and LOOK-M's text prior."""
    n = 600
    vis = torch.zeros(n, dtype=torch.bool)
    vis[10 : n - 20] = True
    needle = 5 if where == "text" else 300
    req = make_request(
        num_layers=4, heads=8, kv_heads=2, n=n, vis=vis, needle=needle, window=16, seed=3
    )
    cfg = KVPolicyConfig(kv_policy=policy, kv_window=16, kv_budget=0.2)
    plan = compress(req.get_view(cfg), 4, cfg, n)
    for layer, lp in enumerate(plan.layers):
        if plan.layer_budgets[layer] > 32:
            assert bool((lp.kept == needle).any(1).all()), (layer, plan.layer_budgets)


def test_streamingllm_keeps_sinks_and_recent():
    req = _request(500, 4, torch.float32)
    cfg = KVPolicyConfig(kv_policy="streamingllm", kv_budget=100, kv_sink_tokens=4)
    plan = compress(req.get_view(cfg), NUM_LAYERS, cfg, 500)
    want = torch.cat([torch.arange(4), torch.arange(404, 500)])
    for lp in plan.layers:
        assert torch.equal(lp.kept, want.expand_as(lp.kept))


def test_h2o_keeps_recent_half():
    req = _request(500, 4, torch.float32)
    cfg = KVPolicyConfig(kv_policy="h2o", kv_budget=100, kv_window=8)
    plan = compress(req.get_view(cfg), NUM_LAYERS, cfg, 500)
    for lp in plan.layers:
        assert bool(torch.isin(torch.arange(450, 500), lp.kept).all())


@pytest.mark.parametrize("budget", [3, 10, 40])
def test_budgets_below_the_window(budget):
    """A budget below the window keeps the last ``budget`` positions, nothing else."""
    req = _request(200, 4, torch.float32)
    for policy in EVICTING_POLICIES:
        cfg = KVPolicyConfig(
            kv_policy=policy, kv_budget=budget, kv_window=64, kv_min_tokens_per_layer=1
        )
        plan = compress(req.get_view(cfg), NUM_LAYERS, cfg, 200)
        for layer, lp in enumerate(plan.layers):
            s_l = plan.layer_budgets[layer]
            if s_l <= 64:
                assert torch.equal(lp.kept, torch.arange(200 - s_l, 200).expand_as(lp.kept))


@pytest.mark.parametrize("policy", EVICTING_POLICIES)
def test_never_materialises_n_by_n(policy, monkeypatch):
    """With the work-size caps lowered below N*N, no product reaches N*N and the plan is
    the same as with the default caps."""
    from meda_vllm import entropy, merging, selection

    n = 600
    req = make_request(num_layers=2, heads=8, kv_heads=2, n=n, seed=5)
    cfg = KVPolicyConfig(kv_policy=policy, kv_window=16, kv_h2o_max_queries=600)
    reference = compress(req.get_view(cfg), 2, cfg, n)
    for module in (selection, merging, entropy):
        monkeypatch.setattr(module, "_MAX_ELEMS", n * n // 8)
    sizes = []
    real_matmul = torch.matmul

    def spy(a, b):
        out = real_matmul(a, b)
        sizes.append(out.numel())
        return out

    monkeypatch.setattr(torch, "matmul", spy)
    plan = compress(req.get_view(cfg), 2, cfg, n)
    assert max(sizes, default=0) < n * n
    assert plan.layer_budgets == reference.layer_budgets
    for a, b in zip(plan.layers, reference.layers, strict=True):
        assert torch.equal(a.kept, b.kept)
        if a.keys is not None:
            torch.testing.assert_close(a.keys, b.keys)
