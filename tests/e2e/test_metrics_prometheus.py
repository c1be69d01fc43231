"""``meda:`` metrics through a real Prometheus: every PromQL of the Grafana dashboard has data.

A real CPU ``vllm serve --kv-policy meda --kv-budget 0.2`` (shared with test_serve.py
through ``server_factory``) and a real ``prometheus`` binary (Debian package, installed
by scripts/setup-cpu.sh) scraping it every second into a temporary folder.
"""

from __future__ import annotations

import math
import shutil
import sys
import time
from pathlib import Path

import pytest

from meda_vllm.testing.prometheus import Prometheus, dashboard_queries, metric_names
from meda_vllm.vllm_adapter import metrics
from tests.e2e.client import chat, run_concurrently, wait_idle
from tests.e2e.media import image_part, text_part

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

ROOT = Path(__file__).resolve().parents[2]
DASHBOARD = ROOT / "deploy" / "grafana" / "dashboards" / "meda-vllm.json"
MEDA = ["--kv-policy", "meda", "--kv-budget", "0.2"]
# Four to five scrapes at 1 s, so rate() over it always has two samples after the load.
RATE_INTERVAL = "1m"


@pytest.fixture(scope="module")
def meda_server(server_factory):
    return server_factory("meda-0.2", MEDA)


@pytest.fixture(scope="module")
def prometheus(meda_server, tmp_path_factory):
    if shutil.which("prometheus") is None:
        pytest.fail("prometheus binary not on PATH: run scripts/setup-cpu.sh (apt package)")
    target = meda_server.url.removeprefix("http://")
    prom = Prometheus([target], tmp_path_factory.mktemp("prometheus"), scrape_interval="1s")
    prom.start()
    try:
        prom.wait_target_up(timeout=60)
        yield prom
    finally:
        prom.stop()


def _total(prom: Prometheus, expr: str) -> float:
    return prom.value(f"sum({expr})")


@pytest.fixture(scope="module")
def loaded(meda_server, prometheus):
    """Send the mix once (after Prometheus has a baseline); return counters before it."""
    time.sleep(2.5)  # two scrapes of the baseline: rate() then sees every increment
    before = {
        "compressed": _total(prometheus, "meda:requests_compressed_total"),
        "success": _total(prometheus, "vllm:request_success_total"),
        "disabled": _total(prometheus, 'meda:requests_skipped_total{reason="disabled_by_request"}'),
        "short": _total(prometheus, 'meda:requests_skipped_total{reason="short_prompt"}'),
        "text_only": _total(prometheus, 'meda:requests_fallback_total{reason="text_only"}'),
        "freed": _total(prometheus, "meda:kv_blocks_freed_total"),
    }
    long_image = [image_part(1, 896), text_part("Describe this picture in detail.")]
    jobs = [
        lambda: chat(meda_server, long_image, max_tokens=24, ignore_eos=True),
        lambda: chat(meda_server, [image_part(2, 896), text_part("Describe.")], max_tokens=24),
        lambda: chat(meda_server, [image_part(3), image_part(4, 448), text_part("Compare.")]),
        lambda: chat(meda_server, [image_part(5), text_part("What is this?")]),
        # compressed with MEDA's uniform fallback budgets: text only
        lambda: chat(meda_server, [text_part("Tell me a story about a cat. " * 8)]),
        # skipped: disabled by the request
        lambda: chat(
            meda_server, [image_part(6), text_part("Hi.")], vllm_xargs={"kv_policy": "none"}
        ),
        # skipped: the budget keeps the whole prompt
        lambda: chat(
            meda_server, [image_part(7), text_part("Hi.")], vllm_xargs={"kv_budget": 4000}
        ),
    ]
    run_concurrently(jobs)
    wait_idle(meda_server)
    n_compressed = 5
    prometheus.wait_for(
        "sum(meda:requests_compressed_total)",
        lambda v: v >= before["compressed"] + n_compressed,
        timeout=30,
    )
    prometheus.wait_for(
        "sum(vllm:request_success_total)", lambda v: v >= before["success"] + len(jobs), timeout=30
    )
    time.sleep(2.5)  # and the idle state after it
    return before


def test_dashboard_promql_all_return_data(prometheus, loaded):
    queries = dashboard_queries(DASHBOARD)
    assert len(queries) >= 20
    empty, nan_only = [], []
    for q in queries:
        result = prometheus.query(q.promql(rate_interval=RATE_INTERVAL))
        values = [float(r["value"][1]) for r in result]
        if not values:
            empty.append(f"{q.panel} [{q.ref}]: {q.promql(RATE_INTERVAL)}")
        elif not any(math.isfinite(v) for v in values):
            nan_only.append(f"{q.panel} [{q.ref}]: {q.promql(RATE_INTERVAL)} -> {values}")
    assert not empty, "no data:\n" + "\n".join(empty)
    assert not nan_only, "only NaN:\n" + "\n".join(nan_only)


def test_dashboard_model_variable_lists_the_served_model(prometheus, loaded, meda_server):
    models = prometheus.api("label/model_name/values", **{"match[]": "vllm:num_requests_running"})
    assert models == [meda_server.model]


def test_counters_count_what_was_sent(prometheus, loaded):
    after = {
        "disabled": 'meda:requests_skipped_total{reason="disabled_by_request"}',
        "short": 'meda:requests_skipped_total{reason="short_prompt"}',
        "text_only": 'meda:requests_fallback_total{reason="text_only"}',
    }
    for key, expr in after.items():
        assert _total(prometheus, expr) >= loaded[key] + 1, key
    assert _total(prometheus, "meda:kv_blocks_freed_total") > loaded["freed"]
    # bytes saved = blocks freed x bytes per block (all layers), exactly
    freed = _total(prometheus, "meda:kv_blocks_freed_total")
    saved = _total(prometheus, "meda:kv_bytes_saved_total")
    assert saved > 0 and saved % freed == 0
    info = prometheus.query("meda:kv_policy_info")
    assert [(r["metric"]["policy"], r["metric"]["budget"]) for r in info] == [("meda", "0.2")]
    ratio = prometheus.value(
        "sum(meda:kv_tokens_after_total) / sum(meda:kv_tokens_before_total)", math.nan
    )
    assert 0.15 <= ratio <= 0.3
    # Idle: nothing held, so nothing saved right now.
    assert prometheus.value("sum(meda:kv_blocks_saved)") == 0


def test_metric_names_on_the_server_match_the_dashboard_and_metrics_py(meda_server, loaded):
    exposed = set(meda_server.metrics())
    used = set().union(*(metric_names(q.expr) for q in dashboard_queries(DASHBOARD)))
    assert used - exposed == set()
    meda_on_server = {n for n in exposed if n.startswith("meda:")}
    assert meda_on_server == set(metrics.exposed_names())


def test_renderer_draws_the_dashboard_from_prometheus(prometheus, loaded, tmp_path):
    pytest.importorskip("matplotlib")
    sys.path.insert(0, str(ROOT / "deploy"))
    try:
        import render_dashboard
    finally:
        sys.path.remove(str(ROOT / "deploy"))
    end = time.time()
    out = render_dashboard.render(prometheus, tmp_path / "d.png", end - 60, end, 2, "10s")
    assert out.stat().st_size > 50_000
