"""The workspace estimate (``meda_vllm.workspace.layer_cost``) against the tensors the
Triton kernels (interpreter here) and the core really create while one request is
planned and compacted: the measured peak of live bytes never exceeds the estimate, and a
workspace that fits one layer at a time keeps the peak within it (and below the peak of
all layers at once)."""

from __future__ import annotations

import weakref

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

pytest.importorskip("pydantic")

from meda_vllm.compress import required_query_positions  # noqa: E402
from meda_vllm.config import KVPolicyConfig  # noqa: E402
from meda_vllm.paged_view import apply_plan, plan_paged_request  # noqa: E402
from meda_vllm.policies import build_policy  # noqa: E402
from meda_vllm.policies.meda import MEDAPolicy  # noqa: E402
from meda_vllm.testing.synthetic import paged_request  # noqa: E402
from meda_vllm.workspace import layer_cost  # noqa: E402


class LiveBytes(TorchDispatchMode):
    """Peak bytes of the storages created by torch ops while active (views and in-place
    results count once; storages of the tensors in ``existing`` are not counted)."""

    def __init__(self, existing=()):
        super().__init__()
        self.outside = {t.untyped_storage().data_ptr() for t in existing}
        self.refs: dict[int, int] = {}
        self.current = self.peak = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor):
                self._track(t)
        return out

    def _track(self, t):
        storage = t.untyped_storage()
        key, size = storage.data_ptr(), storage.nbytes()
        if key == 0 or key in self.outside:
            return
        if key not in self.refs:
            self.refs[key] = 0
            self.current += size
            self.peak = max(self.peak, self.current)
        self.refs[key] += 1
        weakref.finalize(t, self._drop, key, size)

    def _drop(self, key, size):
        self.refs[key] -= 1
        if self.refs[key] == 0:
            del self.refs[key]
            self.current -= size


GEOMETRIES = [  # (N, layers, H_kv, group, D, dtype)
    (200, 4, 2, 2, 16, torch.float32),
    (160, 3, 4, 1, 32, torch.float16),
]


def _run(req, cfg, heads, *, fast, workspace):
    pos = required_query_positions(cfg, req.n, req.vis)
    rows = [r.to(req.caches[0].dtype) for r in req.query_rows(heads, pos)]
    existing = [*req.caches, req.row, *rows, pos, req.vis]
    with LiveBytes(existing) as live:
        plan = plan_paged_request(
            req.caches, req.layouts, req.row, req.n, rows.__getitem__, pos, req.vis, cfg,
            fast=fast, workspace=workspace,
        )  # fmt: skip
        apply_plan(req.caches, req.layouts, req.row, plan)
        del plan
    return live.peak, pos


def _cost(req, cfg, pos, heads, p, *, fast, merged_retained):
    policy = build_policy(cfg)
    entropy = 0
    if isinstance(policy, MEDAPolicy):
        entropy = int(policy.entropy_positions(req.n, req.vis).numel())
    return layer_cost(
        req.n, p, heads=heads, kv_heads=req.layouts[0].num_kv_heads,
        head_size=req.layouts[0].head_size, dtype=req.caches[0].dtype,
        merge=policy.merge, score_rows=policy.score_rows(req.n), entropy_rows=entropy,
        query_rows=int(pos.numel()), fast=fast, merged_retained=merged_retained,
    )  # fmt: skip


@pytest.mark.parametrize("geometry", GEOMETRIES)
@pytest.mark.parametrize("policy", ["snapkv", "meda_weighted", "madakv", "lookm"])
def test_estimate_covers_the_measured_peak(policy, geometry, monkeypatch):
    n, layers, h_kv, group, d, dtype = geometry
    extra = {"kv_merge": "weighted"} if policy == "meda_weighted" else {}
    cfg = KVPolicyConfig.from_mapping(
        {"kv_policy": policy.split("_")[0], "kv_budget": 0.3, "kv_window": 16, **extra}
    )
    heads = h_kv * group

    def request():
        req = paged_request(n, layers, h_kv, d, 16, layout="nhd", seed=5)
        req.caches = [c.to(dtype) for c in req.caches]
        return req

    monkeypatch.setenv("MEDA_KERNELS", "triton")
    req = request()
    whole, pos = _run(req, cfg, heads, fast=True, workspace=None)
    ref = request()
    plan = plan_paged_request(
        ref.caches, ref.layouts, ref.row, n,
        [r.to(dtype) for r in ref.query_rows(heads, pos)].__getitem__, pos, ref.vis, cfg,
        fast=True,
    )  # fmt: skip
    p = plan.kept_tokens
    cost = _cost(req, cfg, pos, heads, p, fast=True, merged_retained=False)
    assert whole <= cost.chunk_bytes(layers, layers), (whole, cost)
    # a workspace of one layer at a time (as the planner sizes it: at most N - 1 slots)
    one = cost.chunk_bytes(layers, 1)
    worst = _cost(req, cfg, pos, heads, n - 1, fast=True, merged_retained=False)
    assert worst.layers_per_chunk(layers, one) < layers  # so the planner chunks
    chunked, _ = _run(request(), cfg, heads, fast=True, workspace=one)
    assert chunked <= one, (chunked, one)
    assert chunked < whole
    # the torch path (CPU production), layer by layer
    monkeypatch.setenv("MEDA_KERNELS", "torch")
    dense, _ = _run(request(), cfg, heads, fast=False, workspace=None)
    cost_t = _cost(req, cfg, pos, heads, p, fast=False, merged_retained=True)
    assert dense <= cost_t.chunk_bytes(layers, 1), (dense, cost_t)
