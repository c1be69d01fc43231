"""The worker's whole planning path with the Triton kernels (interpreter here) gives the
plan of its torch references, for every policy: window scores, MEDA's entropy and merging
(average and weighted) through ``paged_view.plan_paged_request``, then compaction. The
Triton side plans all layers as one layer set, the reference layer by layer."""

import pytest
import torch

pytest.importorskip("pydantic")  # the core's config; the GPU machines may lack it

from meda_vllm.compress import required_query_positions  # noqa: E402
from meda_vllm.config import KVPolicyConfig  # noqa: E402
from meda_vllm.kernels import dispatch  # noqa: E402
from meda_vllm.paged_view import apply_plan, plan_paged_request  # noqa: E402
from meda_vllm.testing.synthetic import paged_request  # noqa: E402

POLICIES = ["snapkv", "pyramidkv", "meda", "madakv", "h2o", "lookm", "streamingllm"]


def _plan(req, cfg, heads, backend, monkeypatch, layer_sets=True):
    monkeypatch.setenv("MEDA_KERNELS", backend)
    pos = required_query_positions(cfg, req.n, req.vis)
    rows = req.query_rows(heads, pos)
    return plan_paged_request(
        req.caches, req.layouts, req.row, req.n, rows.__getitem__, pos, req.vis, cfg,
        fast=True, layer_sets=layer_sets,
    )  # fmt: skip


def _count_launches(monkeypatch) -> list[str]:
    """Names of the Triton kernels launched from now on (every launcher goes through
    ``dispatch.launchable``)."""
    launched = []
    real = dispatch.launchable

    def counted(kernel, device):
        launched.append(getattr(kernel, "__name__", str(kernel)))
        return real(kernel, device)

    monkeypatch.setattr(dispatch, "launchable", counted)
    return launched


@pytest.mark.parametrize("policy", POLICIES)
def test_triton_plan_matches_the_torch_plan(policy, monkeypatch):
    n, layers, heads, h_kv, d = 200, 3, 8, 2, 32
    req = paged_request(n, layers, h_kv, d, 16, layout="nhd", dtype=torch.float32, seed=3)
    extra = {"kv_merge": "weighted"} if policy == "lookm" else {}
    cfg = KVPolicyConfig.from_mapping(
        {"kv_policy": policy, "kv_budget": 0.3, "kv_window": 16, **extra}
    )
    ref = _plan(req, cfg, heads, "torch", monkeypatch, layer_sets=False)
    launches = _count_launches(monkeypatch)
    got = _plan(req, cfg, heads, "triton", monkeypatch)
    assert ref is not None and got is not None
    assert ref.layer_set is None and got.layer_set is not None
    assert got.layer_budgets == ref.layer_budgets
    if ref.entropy is not None:
        assert got.entropy == pytest.approx(ref.entropy, rel=1e-4)
    for a, b in zip(ref.layers, got.layers, strict=True):
        assert torch.equal(a.kept, b.kept)
        assert (a.keys is None) == (b.keys is None)
        if a.keys is not None:
            torch.testing.assert_close(b.keys, a.keys, rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(b.values, a.values, rtol=1e-5, atol=1e-5)

    # compaction through the write kernel leaves what the reference leaves
    twin = paged_request(n, layers, h_kv, d, 16, layout="nhd", dtype=torch.float32, seed=3)
    monkeypatch.setenv("MEDA_KERNELS", "triton")
    apply_plan(req.caches, req.layouts, req.row, got)
    # each op once for all three layers (layer by layer would be 3x): scores 3, entropy 2
    # (MEDA: both 4, their statistics passes share a launch), merge 3 (gather, match,
    # accumulate), compaction 2 (gather, write; 1 after a merge)
    want = {"meda": 8, "lookm": 7, "streamingllm": 2}.get(policy, 5)
    assert len(launches) == want, launches
    monkeypatch.setenv("MEDA_KERNELS", "torch")
    apply_plan(twin.caches, twin.layouts, twin.row, ref)
    for x, y in zip(req.caches, twin.caches, strict=True):
        torch.testing.assert_close(x, y, rtol=1e-5, atol=1e-5)
