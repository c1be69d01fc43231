"""The worker's compression step on a paged cache, without an engine: the cache is
compacted to the plan, the row is cut to the kept blocks, the kept length is reported;
a failing plan leaves the cache and the request untouched."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from meda_vllm.config import KVPolicyConfig
from meda_vllm.kernels import PagedKVLayout, gather_kv
from meda_vllm.vllm_adapter import capture, worker
from meda_vllm.vllm_adapter.worker import RequestInfo, WorkerCompression

N, H, H_KV, D, BS, LAYERS = 200, 4, 2, 32, 32, 2


def _state(policy: str, budget: float):
    g = torch.Generator().manual_seed(0)
    layout = PagedKVLayout.cpu_vec(H_KV, BS, D)
    num_blocks = 12
    caches = {
        f"layers.{i}.attn": torch.randn(num_blocks, H_KV, BS, 2 * D, generator=g)
        for i in range(LAYERS)
    }
    runner = SimpleNamespace(
        compilation_config=SimpleNamespace(
            static_forward_context={n: SimpleNamespace(kv_cache=c) for n, c in caches.items()}
        ),
        vllm_config=SimpleNamespace(),
    )
    cfg = KVPolicyConfig.from_mapping({"kv_policy": policy, "kv_budget": budget, "kv_window": 8})
    state = WorkerCompression(runner=runner, server=cfg)
    state.layer_names = list(caches)
    state.layouts = [layout] * LAYERS
    state.block_size = BS
    state.ready = True
    vis = torch.zeros(N, dtype=torch.bool)
    vis[20:150] = True
    state.infos["r"] = RequestInfo(cfg=cfg, n_prompt=N, vis=vis)
    positions = worker.required_query_positions(cfg, N, vis)
    cap = capture.RequestCapture(positions=positions)
    for layer in range(LAYERS):
        cap.rows[layer] = torch.randn(positions.numel(), H, D, generator=g)
    state.captures["r"] = cap
    row_ids = [7, 2, 9, 0, 11, 4, 5]  # 7 blocks >= cdiv(200, 32)
    return state, cfg, caches, layout, row_ids


@pytest.mark.parametrize("policy", ["snapkv", "meda", "madakv"])
def test_compacts_cuts_the_row_and_reports(policy):
    state, cfg, caches, layout, row_ids = _state(policy, 0.25)
    row = torch.tensor(row_ids[: -(-N // BS)], dtype=torch.int32)
    before = {n: gather_kv(c, layout, row, N) for n, c in caches.items()}
    cut: list[int] = []
    state.compress_request("r", [list(row_ids)], cut.append)
    assert "r" in state.results
    n, (kept,) = state.results["r"]  # one KV cache group
    assert n == N and kept < N
    assert cut == [[-(-kept // BS)]]
    assert state.removed["r"] == (N - kept,)
    assert "r" not in state.captures  # buffer freed
    # the leading `kept` slots of every head now hold `kept` distinct prompt tokens
    for name, cache in caches.items():
        k_after, _ = gather_kv(cache, layout, row, kept)
        k_before = before[name][0]
        assert k_after.shape == (H_KV, kept, D)
        if policy != "meda":  # no merging: kept keys are exact copies of prompt keys
            for h in range(H_KV):
                same = (k_after[h][:, None, :] == k_before[h][None, :, :]).all(-1)
                assert bool(same.any(-1).all())  # every slot is some prompt token's key
                assert int(same.any(0).sum()) == kept  # ... and all different tokens


def test_a_failing_plan_leaves_everything_as_it_was(monkeypatch):
    state, cfg, caches, _, row_ids = _state("meda", 0.25)
    snapshot = {n: c.clone() for n, c in caches.items()}

    def boom(*args, **kwargs):
        raise RuntimeError("injected")

    monkeypatch.setattr(worker, "plan_paged_request", boom)
    cut: list[int] = []
    state.compress_request("r", [list(row_ids)], cut.append)
    assert cut == [] and "r" not in state.results and "r" not in state.removed
    for n, c in caches.items():
        assert torch.equal(c, snapshot[n])


def test_a_workspace_too_small_for_one_layer_skips_the_request(monkeypatch):
    """kv_workspace_bytes below one layer's need: served uncompressed, skipped{workspace}."""
    state, cfg, caches, _, row_ids = _state("meda", 0.25)
    state.workspace_bytes = 1 << 12
    snapshot = {n: c.clone() for n, c in caches.items()}
    skips: list[str] = []
    monkeypatch.setattr(worker.metrics, "on_skip", lambda reason, cfg=None: skips.append(reason))
    cut: list[int] = []
    state.compress_request("r", [list(row_ids)], cut.append)
    assert skips == ["workspace"]
    assert cut == [] and "r" not in state.results and "r" not in state.removed
    for n, c in caches.items():
        assert torch.equal(c, snapshot[n])
    # the same request with room for it is compressed
    state, cfg, caches, _, row_ids = _state("meda", 0.25)
    state.workspace_bytes = 1 << 30
    state.compress_request("r", [list(row_ids)], cut.append)
    assert "r" in state.results and skips == ["workspace"]
