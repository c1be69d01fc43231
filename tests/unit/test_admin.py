"""The admin API's pieces without a server (admin.py, settings' run-time defaults); the
routes themselves: tests/e2e/test_admin_api.py."""

from __future__ import annotations

import pytest

from meda_vllm.config import ConfigError, KVPolicyConfig
from meda_vllm.vllm_adapter import admin, metrics, settings


@pytest.fixture
def server():
    settings._RUNTIME_DEFAULTS.clear()
    yield KVPolicyConfig(kv_policy="meda", kv_budget=0.2)
    settings._RUNTIME_DEFAULTS.clear()


def test_a_change_applies_to_new_requests_under_their_own_settings(server):
    assert settings.with_runtime_defaults(None) is None  # nothing changed: untouched
    now = settings.change_runtime_defaults(server, {"kv_budget": 0.5})
    assert (now.kv_policy, now.kv_budget) == ("meda", 0.5)
    settings.change_runtime_defaults(server, {"kv_policy": "snapkv"})  # adds to the first
    assert settings.runtime_defaults() == {"kv_budget": 0.5, "kv_policy": "snapkv"}
    assert settings.with_runtime_defaults(None) == {"kv_budget": 0.5, "kv_policy": "snapkv"}
    own = settings.with_runtime_defaults({"kv_budget": 0.1, "other": 1})
    assert own == {"kv_budget": 0.1, "kv_policy": "snapkv", "other": 1}
    view = admin.policy_view(server)
    assert (view.policy, view.budget, view.settings["kv_window"]) == ("snapkv", 0.5, 32)


@pytest.mark.parametrize(
    "change, words",
    [
        ({"kv_budget": 0}, "kv_budget"),
        ({"kv_policy": "nope"}, "kv_policy"),
        ({"kv_workspace_bytes": 1 << 30}, "server-wide"),
        ({"budget": 0.3}, "kv_*"),
    ],
)
def test_a_bad_change_is_refused_and_changes_nothing(server, change, words):
    settings.change_runtime_defaults(server, {"kv_budget": 0.5})
    with pytest.raises(ConfigError, match=words.replace("*", r"\*")):
        settings.change_runtime_defaults(server, change)
    assert settings.runtime_defaults() == {"kv_budget": 0.5}


def test_latency_quantiles_follow_prometheus_histogram_quantile():
    bounds = (0.1, 0.2, 0.4)
    hist = [2.0, 2.0, 0.0, 0.0, 0.5, 4.0]  # per bucket, then sum and count
    assert admin._quantile(0.5, bounds, hist) == pytest.approx(0.1)
    assert admin._quantile(0.75, bounds, hist) == pytest.approx(0.15)
    assert admin._quantile(0.25, bounds, hist) == pytest.approx(0.05)
    assert admin._quantile(0.5, bounds, [0.0] * 5) is None
    over = [0.0, 0.0, 1.0, 5.0, 10.0]  # 9 of 10 above the last bound
    assert admin._quantile(0.99, bounds, over) == pytest.approx(0.4)  # the last bound
    assert admin._quantile(0.05, bounds, over) == pytest.approx(0.3)


def test_stats_sum_every_process_and_label_but_the_reason():
    rec_a, rec_b = (
        metrics.Recorder(None, {"model_name": "m", "engine": "0"}),
        metrics.Recorder(None, {"model_name": "m", "engine": "1"}),
    )
    for rec, freed in ((rec_a, 3), (rec_b, 5)):
        rec.inc("meda:requests_compressed", 2, policy="meda")
        rec.inc("meda:requests_skipped", 1, reason="short_prompt")
        rec.inc("meda:kv_blocks_freed", freed)
        rec.observe("meda:compression_seconds", 0.02)
    rec_a.inc("meda:requests_compressed", 1, policy="snapkv")
    stats = admin.stats_from(metrics.merge_snapshots([rec_a.snapshot(), rec_b.snapshot()]))
    assert stats.requests_compressed == 5
    assert stats.requests_skipped == {"short_prompt": 2}
    assert stats.kv_blocks_freed == 8
    assert stats.compression_seconds.count == 2
    assert stats.compression_seconds.mean_seconds == pytest.approx(0.02)
    assert 0.01 < stats.compression_seconds.p50_seconds <= 0.025


def test_a_request_record_joins_the_worker_and_the_scheduler():
    worker, sched = metrics.Recorder(None), metrics.Recorder(None)
    worker.note_request("chatcmpl-abc-1234abcd", prompt_tokens=100, kept_tokens=20)
    sched.note_request("chatcmpl-abc-1234abcd", blocks_before=7, blocks_after=2, blocks_freed=5)
    snaps = [worker.snapshot(), sched.snapshot()]
    for asked in ("chatcmpl-abc", "chatcmpl-abc-1234abcd"):
        got = admin.find_request(snaps, asked)
        assert (got.prompt_tokens, got.kept_tokens, got.blocks_freed) == (100, 20, 5)
    assert admin.find_request(snaps, "chatcmpl-ab") is None


def test_the_recent_requests_are_bounded(monkeypatch):
    monkeypatch.setattr(metrics.recording, "RECENT_REQUESTS", 3)
    rec = metrics.Recorder(None)
    for i in range(5):
        rec.note_request(f"r{i}", prompt_tokens=i)
    assert list(rec.snapshot()["requests"]) == ["r2", "r3", "r4"]
