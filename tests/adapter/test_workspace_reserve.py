"""The compression workspace at engine start: resolved from the settings and the model,
subtracted from the KV cache budget vLLM found (patch 23), except with an explicit
--kv-cache-memory-bytes (vLLM's KV cache size: the workspace comes on top)."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from meda_vllm.vllm_adapter import memory, metrics, settings
from meda_vllm.workspace import auto_workspace_bytes


class _Model:
    max_model_len = 4096
    dtype = torch.float16

    def get_num_attention_heads(self, pc):
        return 32

    def get_num_kv_heads(self, pc):
        return 8

    def get_head_size(self):
        return 128

    def get_num_layers(self, pc):
        return 32


def _worker(additional, kv_bytes=None):
    cfg = SimpleNamespace(
        additional_config=additional,
        model_config=_Model(),
        parallel_config=SimpleNamespace(data_parallel_rank=0),
        device_config=SimpleNamespace(device_type="cpu"),
        cache_config=SimpleNamespace(kv_cache_memory_bytes=kv_bytes),
    )
    return SimpleNamespace(vllm_config=cfg, available_kv_cache_memory_bytes=10**12)


def test_explicit_workspace_is_taken_out_of_the_kv_budget(monkeypatch):
    seen = []
    monkeypatch.setattr(metrics, "on_workspace", lambda cfg, b: seen.append(b))
    w = _worker({"kv_policy": "meda", "kv_workspace_bytes": 1 << 30})
    assert memory.reserve_workspace(w, 10 << 30) == 9 << 30
    assert w.available_kv_cache_memory_bytes == 9 << 30
    assert seen == [1 << 30]


def test_auto_workspace_is_one_layer_at_max_model_len(monkeypatch):
    monkeypatch.setattr(metrics, "on_workspace", lambda cfg, b: None)
    w = _worker({"kv_policy": "snapkv"})
    got = memory.resolve_workspace(w.vllm_config, settings.server_config(w.vllm_config))
    want = auto_workspace_bytes(
        4096, heads=32, kv_heads=8, head_size=128, dtype=torch.float16,
        max_query_rows=1024, num_layers=32, fast=False,
    )  # fmt: skip
    assert got == want
    assert memory.reserve_workspace(w, 10 << 30) == (10 << 30) - want


def test_workspace_on_top_of_explicit_kv_cache_bytes(monkeypatch):
    seen = []
    monkeypatch.setattr(metrics, "on_workspace", lambda cfg, b: seen.append(b))
    w = _worker({"kv_policy": "meda", "kv_workspace_bytes": 1 << 30}, kv_bytes=64 << 20)
    assert memory.reserve_workspace(w, 64 << 20) == 64 << 20
    assert seen == [1 << 30]


def test_no_policy_reserves_nothing(monkeypatch):
    seen = []
    monkeypatch.setattr(metrics, "on_workspace", lambda cfg, b: seen.append(b))
    w = _worker({})
    assert memory.reserve_workspace(w, 10 << 30) == 10 << 30
    assert seen == []


def test_workspace_larger_than_the_kv_budget_stops_startup(monkeypatch):
    monkeypatch.setattr(metrics, "on_workspace", lambda cfg, b: None)
    w = _worker({"kv_policy": "meda", "kv_workspace_bytes": 2 << 30})
    with pytest.raises(ValueError, match="does not fit the 1073741824 bytes"):
        memory.reserve_workspace(w, 1 << 30)


def test_both_workers_are_patched():
    from vllm.v1.worker.cpu_worker import CPUWorker
    from vllm.v1.worker.gpu_worker import Worker

    from meda_vllm.vllm_adapter import plugin

    plugin.register()
    for cls in (Worker, CPUWorker):
        assert cls.__dict__.get("_meda_patched"), cls
