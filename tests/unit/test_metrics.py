"""metrics.py: per-process snapshots, summed by the API server's collector (no vLLM)."""

from __future__ import annotations

import multiprocessing
import os
import time
from types import SimpleNamespace

import pytest
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from meda_vllm.vllm_adapter import metrics

BASE = {"model_name": "m", "engine": "0"}


def exposition(directory) -> dict[tuple[str, tuple], float]:
    registry = CollectorRegistry()
    metrics.attach_collector(registry)
    metrics.attach_collector(registry)  # idempotent
    registry._meda_collector._directory = directory
    out = {}
    for fam in text_string_to_metric_families(generate_latest(registry).decode()):
        for s in fam.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def _child(directory: str, role: str) -> None:
    rec = metrics.Recorder(directory, dict(BASE))
    if role == "scheduler":
        rec.inc("meda:kv_blocks_freed", 7)
        rec.inc("meda:requests_skipped", reason="short_prompt")
        rec.set("meda:kv_blocks_saved", 5)
    else:
        rec.inc("meda:requests_skipped", 2, reason="short_prompt")
        rec.observe("meda:compression_seconds", 0.003)
        rec.observe("meda:compression_seconds", 0.2)
    rec.flush()


def test_snapshots_of_two_processes_are_summed(tmp_path):
    ctx = multiprocessing.get_context("spawn")
    for role in ("scheduler", "worker"):
        p = ctx.Process(target=_child, args=(str(tmp_path), role))
        p.start()
        p.join(60)
        assert p.exitcode == 0
    assert len(list(tmp_path.glob("p*.json"))) == 2
    got = exposition(tmp_path)
    lab = tuple(sorted(BASE.items()))
    skip = tuple(sorted({**BASE, "reason": "short_prompt"}.items()))
    assert got[("meda:kv_blocks_freed_total", lab)] == 7
    assert got[("meda:requests_skipped_total", skip)] == 3
    assert got[("meda:kv_blocks_saved", lab)] == 5
    le = lambda b: tuple(sorted({**BASE, "le": b}.items()))  # noqa: E731
    assert got[("meda:compression_seconds_bucket", le("0.0025"))] == 0
    assert got[("meda:compression_seconds_bucket", le("0.005"))] == 1
    assert got[("meda:compression_seconds_bucket", le("0.25"))] == 2
    assert got[("meda:compression_seconds_bucket", le("+Inf"))] == 2
    assert got[("meda:compression_seconds_count", lab)] == 2
    assert got[("meda:compression_seconds_sum", lab)] == pytest.approx(0.203)


def test_nothing_exposed_without_snapshots(tmp_path):
    assert exposition(tmp_path) == {}
    assert exposition(tmp_path / "missing") == {}


def test_recorder_rejects_wrong_labels_and_kinds():
    rec = metrics.Recorder(None, dict(BASE))
    with pytest.raises(ValueError, match="labels"):
        rec.inc("meda:requests_skipped")
    with pytest.raises(ValueError, match="counter"):
        rec.set("meda:kv_blocks_freed", 1)


def test_background_flush_writes_after_a_change(tmp_path):
    rec = metrics.Recorder(str(tmp_path), dict(BASE))
    rec.inc("meda:kv_blocks_freed", 3)
    deadline = time.time() + 5
    while not (tmp_path / f"p{os.getpid()}.json").exists() and time.time() < deadline:
        time.sleep(0.05)
    got = exposition(tmp_path)
    assert got[("meda:kv_blocks_freed_total", tuple(sorted(BASE.items())))] == 3


def test_hooks_record_a_compression_and_the_memory(tmp_path, monkeypatch):
    monkeypatch.setenv(metrics.ENV_DIR, str(tmp_path))
    monkeypatch.setattr(metrics.recording, "_RECORDER", None)
    vllm_config = SimpleNamespace(
        model_config=SimpleNamespace(served_model_name="tiny"),
        parallel_config=SimpleNamespace(data_parallel_rank=0),
    )
    # two KV cache groups of one layer each (kv_layer_groups=2): a block is one layer's
    groups = [
        SimpleNamespace(kv_cache_spec=SimpleNamespace(page_size_bytes=1000), layer_names=[name])
        for name in ("l0", "l1")
    ]
    state = SimpleNamespace(
        server=SimpleNamespace(kv_policy="meda", kv_budget=0.2, kv_window=32),
        manager=SimpleNamespace(block_pool=SimpleNamespace(num_gpu_blocks=101)),
        records={"a": SimpleNamespace(blocks_before=10, blocks_after=2)},
    )
    scheduler = SimpleNamespace(
        vllm_config=vllm_config, kv_cache_config=SimpleNamespace(kv_cache_groups=groups)
    )
    metrics.on_scheduler_attached(scheduler, state)
    metrics.on_blocks_freed(state, 8)
    stats = SimpleNamespace(
        n_prompt=100,
        kept=30,
        layer_budgets=[30, 10],
        seconds=0.01,
        fallback="text_only",
        group_kept=(30, 12),  # two KV cache groups (kv_layer_groups=2): physical lengths
    )
    metrics.on_compressed(vllm_config, stats, "meda")
    metrics.on_skip("disabled_by_request")
    metrics.on_workspace(vllm_config, 3 << 20)
    metrics.on_blocks_held([7, 2])
    metrics.recorder().flush()
    got = exposition(tmp_path)
    lab = (("engine", "0"), ("model_name", "tiny"))
    assert got[("meda:kv_blocks_freed_total", lab)] == 8
    assert got[("meda:kv_bytes_saved_total", lab)] == 8 * 1000
    assert got[("meda:kv_blocks_saved", lab)] == 8
    assert got[("meda:kv_cache_saved_perc", lab)] == pytest.approx(0.08)
    assert got[("meda:kv_cache_blocks", lab)] == 100
    assert got[("meda:workspace_bytes", lab)] == 3 << 20
    assert got[("meda:requests_skipped_total", (*lab, ("reason", "workspace")))] == 0
    assert got[("meda:kv_tokens_before_total", lab)] == 100
    assert got[("meda:kv_tokens_after_total", lab)] == 30
    assert got[("meda:requests_compressed_total", (*lab, ("policy", "meda")))] == 1
    assert got[("meda:requests_fallback_total", (*lab, ("reason", "text_only")))] == 1
    assert got[("meda:requests_skipped_total", (*lab, ("reason", "disabled_by_request")))] == 1
    assert got[("meda:requests_skipped_total", (*lab, ("reason", "short_prompt")))] == 0
    assert got[("meda:layer_budget_ratio", (("engine", "0"), ("layer", "0"), lab[1]))] == 0.3
    assert got[("meda:layer_kept_tokens_total", (("engine", "0"), ("layer", "1"), lab[1]))] == 10
    for index, held in enumerate((30, 12)):
        key = ("meda:group_kept_tokens_total", (("engine", "0"), ("group", str(index)), lab[1]))
        assert got[key] == held
    for index, held in enumerate((7, 2)):
        key = ("meda:group_blocks_held", (("engine", "0"), ("group", str(index)), lab[1]))
        assert got[key] == held
    info = ("meda:kv_policy_info", (*lab, ("budget", "0.2"), ("policy", "meda"), ("window", "32")))
    assert got[(info[0], tuple(sorted(info[1])))] == 1
    names = {name for name, _ in got}
    assert names == set(metrics.exposed_names())
    # a finished compressed request: nothing saved any more
    state.records.clear()
    metrics.on_records_changed(state)
    metrics.recorder().flush()
    assert exposition(tmp_path)[("meda:kv_blocks_saved", lab)] == 0


def test_hooks_never_raise(monkeypatch):
    monkeypatch.setattr(metrics.hooks, "_FAILED", ["already reported"])
    metrics.on_scheduler_attached(object(), object())  # logs once, does not raise


def _child_env(queue) -> None:
    metrics.init_process()
    queue.put(os.environ.get(metrics.ENV_DIR))


def test_children_inherit_the_folder_and_top_level_processes_get_their_own(monkeypatch):
    monkeypatch.setenv(metrics.ENV_DIR, "/tmp/inherited-from-a-test-runner")
    metrics.init_process()  # this test process is top-level: a fresh folder
    mine = os.environ[metrics.ENV_DIR]
    assert mine != "/tmp/inherited-from-a-test-runner" and str(os.getpid()) in mine
    ctx = multiprocessing.get_context("spawn")
    queue = ctx.Queue()
    p = ctx.Process(target=_child_env, args=(queue,))
    p.start()
    assert queue.get(timeout=60) == mine
    p.join(60)
