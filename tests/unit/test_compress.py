"""compress(): padding to a physical length, view calls, engine overrides, the rows the
engine must capture, input checks and the policy registry."""

from __future__ import annotations

import subprocess
import sys
from dataclasses import dataclass

import pytest
import torch
from _util import EVICTING_POLICIES, make_request

from meda_vllm import policies
from meda_vllm.compress import compress, required_query_positions
from meda_vllm.config import KVPolicyConfig
from meda_vllm.merging import merge_evicted
from meda_vllm.policies import build_policy, get_policy, register_policy
from meda_vllm.policies.snapkv import SnapKVPolicy
from meda_vllm.types import LayerView


@pytest.mark.parametrize("policy", ["pyramidkv", "meda", "madakv"])
def test_pad_to_max(policy):
    req = make_request(num_layers=4, heads=4, kv_heads=2, n=300, sharpness=[0.3, 1, 2, 3])
    cfg = KVPolicyConfig(kv_policy=policy, kv_budget=0.2, kv_window=8)
    plain = compress(req.get_view(cfg), 4, cfg, 300)
    padded = compress(req.get_view(cfg), 4, cfg, 300, pad_to="max")
    p = max(plain.layer_budgets)
    assert padded.layer_budgets == plain.layer_budgets
    assert padded.kept_tokens == p
    assert plain.kept_tokens == p
    for layer, (a, b) in enumerate(zip(plain.layers, padded.layers, strict=True)):
        assert b.kept.shape[1] == min(p, 300) and b.budget == a.budget
        # The logical selection is kept; padding only adds the next best positions.
        for h in range(a.kept.shape[0]):
            assert set(a.kept[h].tolist()) <= set(b.kept[h].tolist())
        if b.keys is not None:  # merged for the final kept set
            want = merge_evicted(req.keys[layer], req.values[layer], b.kept, "average")
            assert torch.equal(b.keys, want[0])
    assert padded.logical_kept_tokens == sum(plain.layer_budgets)


def test_padding_follows_the_layer_ranking():
    """Uniform SnapKV padded by 10: the extra tokens are the next by pooled score."""
    req = make_request(num_layers=1, n=200, kv_heads=1, heads=4)
    cfg = KVPolicyConfig(kv_policy="snapkv", kv_budget=40, kv_window=8)
    a = compress(req.get_view(cfg), 1, cfg, 200, pad_to=50)
    b = compress(req.get_view(cfg.merged({"budget": 50})), 1, cfg.merged({"budget": 50}), 200)
    assert torch.equal(a.layers[0].kept, b.layers[0].kept)
    assert a.layers[0].budget == 40


def test_pad_to_checks():
    req = make_request(num_layers=2, n=100)
    cfg = KVPolicyConfig(kv_policy="snapkv", kv_budget=30, kv_window=8)
    with pytest.raises(ValueError, match="below the largest layer budget"):
        compress(req.get_view(cfg), 2, cfg, 100, pad_to=20)
    with pytest.raises(ValueError, match="pad_to must be"):
        compress(req.get_view(cfg), 2, cfg, 100, pad_to="min")
    plan = compress(req.get_view(cfg), 2, cfg, 100, pad_to=1000)  # clamped to N
    assert all(torch.equal(lp.kept[0], torch.arange(100)) for lp in plan.layers)


@pytest.mark.parametrize(
    ("policy", "passes"),
    [("snapkv", 1), ("h2o", 1), ("pyramidkv", 1), ("meda", 2), ("madakv", 2)],
)
def test_view_calls(policy, passes):
    req = make_request(num_layers=3, n=100)
    cfg = KVPolicyConfig(kv_policy=policy, kv_window=8)
    compress(req.get_view(cfg), 3, cfg, 100)
    assert req.calls == [0, 1, 2] * passes


@pytest.mark.parametrize("policy", [p for p in EVICTING_POLICIES if p != "streamingllm"])
def test_window_score_override_is_used(policy):
    """With the engine's scores present, the captured queries are never read."""
    n = 120
    req = make_request(num_layers=2, heads=4, kv_heads=2, n=n)
    cfg = KVPolicyConfig(kv_policy=policy, kv_budget=30, kv_window=8, kv_pooling="none")
    scores = torch.rand(2, n) * 0.01
    scores[:, 5] = 5.0  # the override's favourite (a text token), invisible to real attention
    pos = required_query_positions(cfg, n, req.vis)

    def get_view(layer):
        return LayerView(
            keys=req.keys[layer],
            values=req.values[layer],
            queries=torch.full((4, pos.numel(), 16), float("nan")),
            query_pos=pos,
            vis=req.vis,
            window_scores=scores,
            entropy=1.0 + layer,
        )

    plan = compress(get_view, 2, cfg, n)
    for lp in plan.layers:
        if lp.budget > 8:
            assert bool((lp.kept == 5).any(1).all())
        if lp.keys is not None:
            assert bool(torch.isfinite(lp.keys).all())


def test_required_query_positions():
    n = 3000
    vis = torch.zeros(n, dtype=torch.bool)
    vis[100:2900] = True
    window = torch.arange(n - 32, n)

    def rows(**kw):
        return required_query_positions(KVPolicyConfig(**kw), n, vis)

    for policy in ("snapkv", "pyramidkv", "streamingllm", "lookm", "madakv"):
        assert torch.equal(rows(kv_policy=policy), window)
    assert torch.equal(rows(kv_policy="h2o"), torch.arange(n - 1024, n))
    assert torch.equal(rows(kv_policy="h2o", kv_h2o_max_queries=8), window)
    uncapped = rows(kv_policy="meda", kv_meda_visual_stride=8, kv_meda_visual_rows=0)
    assert uncapped.numel() == 32 + 2800 // 8
    meda = rows(kv_policy="meda", kv_meda_visual_stride=8)  # at most 128 visual rows
    assert set(window.tolist()) <= set(meda.tolist())
    assert meda.numel() == 32 + len(range(10, 2800, 22)) <= 32 + 128  # stride ceil(2800/128)
    assert torch.equal(meda, torch.unique(meda))
    assert rows(kv_policy="none").numel() == 0
    assert rows(kv_policy="full").numel() == 0
    assert rows(kv_policy="snapkv", kv_budget=1.0).numel() == 0
    assert KVPolicyConfig(kv_policy="h2o").policy.score_rows(n) == 1024
    assert KVPolicyConfig(kv_policy="snapkv").policy.score_rows(10) == 10


def test_absolute_budget():
    req = make_request(num_layers=2, n=500)
    cfg = KVPolicyConfig(kv_policy="snapkv", kv_budget=64)
    plan = compress(req.get_view(cfg), 2, cfg, 500)
    assert [lp.kept.shape[1] for lp in plan.layers] == [64, 64]
    assert compress(req.get_view(cfg), 2, cfg, 64) is None


def test_none_and_full_return_none_without_reading():
    req = make_request(num_layers=2, n=100)
    for policy in ("none", "full"):
        cfg = KVPolicyConfig(kv_policy=policy)
        assert compress(req.get_view(cfg), 2, cfg, 100) is None
    assert req.calls == []


def test_input_checks():
    req = make_request(num_layers=2, n=100)
    cfg = KVPolicyConfig(kv_policy="snapkv")
    with pytest.raises(ValueError, match="expected 90"):
        compress(req.get_view(cfg), 2, cfg, 90)
    with pytest.raises(ValueError, match="num_layers"):
        compress(req.get_view(cfg), 0, cfg, 100)
    short = lambda i: req.view(i, torch.arange(90, 100))  # noqa: E731 - only 10 rows
    with pytest.raises(ValueError, match="not captured"):
        compress(short, 2, cfg, 100)


def test_view_validation():
    k = torch.zeros(2, 10, 4)
    with pytest.raises(ValueError, match="multiple of KV heads"):
        LayerView(k, k, torch.zeros(3, 1, 4), torch.tensor([9]))
    with pytest.raises(ValueError, match="ascending"):
        LayerView(k, k, torch.zeros(2, 2, 4), torch.tensor([9, 3]))
    with pytest.raises(ValueError, match="vis"):
        LayerView(k, k, torch.zeros(2, 1, 4), torch.tensor([9]), vis=torch.zeros(10))
    view = LayerView(k, k, torch.zeros(6, 1, 4), torch.tensor([9]))
    assert (view.N, view.H, view.H_kv, view.D, view.group) == (10, 6, 2, 4, 3)
    assert view.softmax_scale == 0.5


def test_registry(monkeypatch):
    monkeypatch.setattr(policies, "_REGISTRY", dict(policies._REGISTRY))  # undone after
    assert get_policy("meda").name == "meda"
    with pytest.raises(ValueError, match="kv_policy must be one of"):
        get_policy("nope")

    @dataclass(frozen=True)
    class OldestPolicy(SnapKVPolicy):
        name = "test_oldest"

        def raw_score(self, view):
            return -torch.arange(view.N, dtype=torch.float32).expand(view.H_kv, view.N)

    register_policy(OldestPolicy)
    with pytest.raises(ValueError, match="already registered"):

        @dataclass(frozen=True)
        class Clash(SnapKVPolicy):
            name = "test_oldest"

        register_policy(Clash)
    cfg = KVPolicyConfig(kv_policy="test_oldest", kv_budget=20, kv_window=4)
    assert isinstance(build_policy(cfg), OldestPolicy)
    req = make_request(num_layers=1, n=100)
    plan = compress(req.get_view(cfg), 1, cfg, 100)
    want = torch.cat([torch.arange(16), torch.arange(96, 100)])
    assert torch.equal(plan.layers[0].kept[0], want)


def test_policy_built_from_config():
    cfg = KVPolicyConfig(kv_policy="meda", kv_window=8, kv_pooling="avg", kv_merge="weighted")
    policy = build_policy(cfg)
    assert (policy.window, policy.pooling, policy.merge) == (8, "avg", "weighted")
    assert build_policy(cfg.merged({"merge": None})).merge == "weighted"  # None = not given
    assert build_policy(KVPolicyConfig(kv_policy="meda")).merge == "average"
    assert build_policy(KVPolicyConfig(kv_policy="snapkv")).merge == "none"
    assert build_policy(KVPolicyConfig(kv_policy="h2o")).pooling == "none"


def test_core_does_not_import_vllm():
    code = (
        "import sys, meda_vllm.compress, meda_vllm.policies, meda_vllm.entropy;"
        "sys.exit(1 if any(m == 'vllm' or m.startswith('vllm.') for m in sys.modules) else 0)"
    )
    assert subprocess.run([sys.executable, "-c", code], check=False).returncode == 0


def test_an_inherited_knob_keeps_the_setting_of_the_policy_that_declared_it():
    from meda_vllm.policies.knobs import integer, knob, knobs_of

    @dataclass(frozen=True)
    class Parent(SnapKVPolicy):
        name = "test_parent"
        depth: int = knob(3, integer(1), "how deep")

    @dataclass(frozen=True)
    class Child(Parent):
        name = "test_child"

    @dataclass(frozen=True)
    class Redeclared(Parent):
        name = "test_redeclared"
        depth: int = knob(5, integer(1), "deeper")

    def setting(cls):
        return next(k.setting for k in knobs_of(cls) if k.field == "depth")

    assert setting(Parent) == setting(Child) == "kv_test_parent_depth"
    assert setting(Redeclared) == "kv_test_redeclared_depth"
