"""deploy/: the dashboard, Grafana provisioning, Prometheus config, compose files, Dockerfiles.

Parsed and cross-checked without Docker or a server: every metric the dashboard queries
is one the server exposes (``meda:`` names from metrics.py's definitions, ``vllm:``
names from the list below, each checked against vLLM's own metric definitions);
``promtool`` (Debian package ``prometheus``) checks the config and every expression's
syntax when it is installed. tests/e2e/test_metrics_prometheus.py runs them for real.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from meda_vllm.testing.prometheus import dashboard_queries, expand, metric_names
from meda_vllm.vllm_adapter import metrics

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
DASHBOARD = DEPLOY / "grafana" / "dashboards" / "meda-vllm.json"
COMPOSE = {"gpu": DEPLOY / "docker-compose.yml", "cpu": DEPLOY / "docker-compose.cpu.yml"}

#: vLLM 0.32 sample names the dashboard may use (seen on a real server's /metrics by
#: tests/e2e/test_metrics_prometheus.py; each family is checked against vLLM's source below).
VLLM_NAMES = {
    "vllm:kv_cache_usage_perc",
    "vllm:num_requests_running",
    "vllm:num_requests_waiting",
    "vllm:time_to_first_token_seconds_bucket",
    "vllm:request_time_per_output_token_seconds_bucket",
    "vllm:inter_token_latency_seconds_bucket",
    "vllm:e2e_request_latency_seconds_bucket",
    "vllm:prompt_tokens_total",
    "vllm:generation_tokens_total",
    "vllm:request_success_total",
    "vllm:num_preemptions_total",
}


def load_yaml(path: Path):
    return yaml.safe_load(path.read_text())


@pytest.fixture(scope="module")
def dashboard() -> dict:
    return json.loads(DASHBOARD.read_text())


def test_dashboard_is_a_grafana_dashboard(dashboard):
    assert dashboard["uid"] == "meda-vllm"
    assert isinstance(dashboard["schemaVersion"], int)
    ids = [p["id"] for p in dashboard["panels"]]
    assert len(ids) == len(set(ids))
    variables = {v["name"]: v for v in dashboard["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource"
    assert variables["datasource"]["query"] == "prometheus"
    assert "model_name" in variables["model"]["query"]["query"]
    for panel in dashboard["panels"]:
        g = panel["gridPos"]
        assert g["x"] >= 0 and g["x"] + g["w"] <= 24, panel["title"]
        assert panel["datasource"]["uid"] == "${datasource}", panel["title"]
        assert panel["targets"], panel["title"]
        for t in panel["targets"]:
            assert t["expr"].strip(), panel["title"]
            assert t["datasource"]["uid"] == "${datasource}"


def test_dashboard_covers_the_issue(dashboard):
    text = " ".join(q.expr for q in dashboard_queries(dashboard))
    for needle in (
        "vllm:kv_cache_usage_perc",
        "meda:kv_cache_saved_perc",  # usage without compression
        "meda:kv_blocks_freed_total",
        "meda:compression_ratio_bucket",
        "meda:compression_seconds_bucket",
        "vllm:num_requests_running",
        "vllm:num_requests_waiting",
        "vllm:time_to_first_token_seconds_bucket",
        "vllm:request_time_per_output_token_seconds_bucket",
        "meda:requests_skipped_total",
        "meda:layer_budget_ratio",
    ):
        assert needle in text, needle


def test_every_metric_in_the_dashboard_is_exposed(dashboard):
    used = set().union(*(metric_names(q.expr) for q in dashboard_queries(dashboard)))
    used |= metric_names(json.dumps(dashboard["templating"]))
    exposed = set(metrics.exposed_names()) | VLLM_NAMES
    assert used - exposed == set()
    assert any(n.startswith("meda:") for n in used) and any(n.startswith("vllm:") for n in used)


def test_every_dashboard_expression_filters_by_the_model_variable(dashboard):
    for q in dashboard_queries(dashboard):
        for m in re.finditer(r"\b((?:vllm|meda):[a-zA-Z0-9_:]+)(\{[^}]*\})?", q.expr):
            assert m.group(2) and 'model_name=~"$model"' in m.group(2), (q.panel, q.expr)


def _family(sample: str) -> str:
    for suffix in ("_bucket", "_sum", "_count", "_total"):
        if sample.endswith(suffix):
            return sample[: -len(suffix)]
    return sample


def test_vllm_names_exist_in_the_installed_vllm():
    pytest.importorskip("vllm")
    import importlib.util

    spec = importlib.util.find_spec("vllm.v1.metrics.loggers")
    source = Path(spec.origin).read_text()
    for name in VLLM_NAMES:
        assert f'"{_family(name)}"' in source, name


def test_metrics_py_names_are_valid_and_prefixed():
    names = metrics.exposed_names(admin_api=True)
    assert len(names) == len(set(names))
    for name in names:
        assert re.fullmatch(r"meda:[a-z_]+", name), name
    for d in metrics.METRICS.values():
        assert d.labelnames[:2] == ("model_name", "engine")
        if d.kind == "histogram":
            assert list(d.buckets) == sorted(d.buckets)


def test_grafana_provisioning():
    ds = load_yaml(DEPLOY / "grafana/provisioning/datasources/prometheus.yml")
    (source,) = ds["datasources"]
    assert source["type"] == "prometheus" and source["uid"] == "prometheus"
    assert source["url"] == "http://prometheus:9090"
    dash = load_yaml(DEPLOY / "grafana/provisioning/dashboards/meda-vllm.yml")
    (provider,) = dash["providers"]
    assert provider["type"] == "file"
    assert provider["options"]["path"] == "/var/lib/grafana/dashboards"


def test_prometheus_config():
    cfg = load_yaml(DEPLOY / "prometheus/prometheus.yml")
    (job,) = cfg["scrape_configs"]
    assert job["metrics_path"] == "/metrics"
    assert job["static_configs"][0]["targets"] == ["vllm:8000"]


@pytest.mark.parametrize("variant", sorted(COMPOSE))
def test_compose_file(variant):
    compose = load_yaml(COMPOSE[variant])
    services = compose["services"]
    assert {"vllm", "prometheus", "grafana"} <= set(services)
    vllm = services["vllm"]
    dockerfile = ROOT / vllm["build"]["context"].replace("..", ".") / vllm["build"]["dockerfile"]
    assert dockerfile.is_file(), dockerfile
    command = " ".join(vllm["command"])
    assert "--kv-policy" in command and "--kv-budget" in command
    assert "8000" in command
    if variant == "gpu":
        devices = vllm["deploy"]["resources"]["reservations"]["devices"]
        assert devices[0]["driver"] == "nvidia"
    else:
        assert "meda_vllm.testing.tiny_qwen2vl" in command
        assert services["load"]["depends_on"]["vllm"]["condition"] == "service_healthy"
        assert (ROOT / services["load"]["entrypoint"][1]).is_file()
    for name in ("prometheus", "grafana"):
        for volume in services[name].get("volumes", []):
            src, dst = volume.split(":")[:2]
            if src.startswith("./"):
                assert (DEPLOY / src).exists(), volume
    grafana_mounts = dict(v.split(":")[:2][::-1] for v in services["grafana"]["volumes"])
    assert grafana_mounts["/var/lib/grafana/dashboards"] == "./grafana/dashboards"
    assert grafana_mounts["/etc/grafana/provisioning"] == "./grafana/provisioning"
    home = services["grafana"]["environment"]["GF_DASHBOARDS_DEFAULT_HOME_DASHBOARD_PATH"]
    assert home == "/var/lib/grafana/dashboards/" + DASHBOARD.name


def test_dockerfiles():
    gpu = (ROOT / "Dockerfile").read_text()
    (tag,) = re.findall(r"^ARG VLLM_IMAGE=(\S+)$", gpu, re.M)
    assert re.fullmatch(r"vllm/vllm-openai:v0\.32\.\d+", tag), tag
    assert "FROM ${VLLM_IMAGE}" in gpu
    assert "--kv-policy" in gpu and '"vllm", "serve"' in gpu
    cpu = (ROOT / "Dockerfile.cpu").read_text()
    assert "scripts/setup-cpu.sh" in cpu and "MEDA_SETUP_PROMETHEUS=0" in cpu


@pytest.mark.skipif(shutil.which("promtool") is None, reason="promtool not installed")
def test_promtool_accepts_the_config_and_every_expression(dashboard, tmp_path):
    check = subprocess.run(
        ["promtool", "check", "config", "--syntax-only", str(DEPLOY / "prometheus/prometheus.yml")],
        capture_output=True,
        text=True,
    )
    assert check.returncode == 0, check.stdout + check.stderr
    rules = {
        "groups": [
            {
                "name": "dashboard",
                "rules": [
                    {"record": f"dashboard:q{i}", "expr": expand(q.expr, rate_interval="1m")}
                    for i, q in enumerate(dashboard_queries(dashboard))
                ],
            }
        ]
    }
    path = tmp_path / "rules.yml"
    path.write_text(yaml.safe_dump(rules))
    check = subprocess.run(
        ["promtool", "check", "rules", str(path)], capture_output=True, text=True
    )
    assert check.returncode == 0, check.stdout + check.stderr
