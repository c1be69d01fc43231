"""A real ``prometheus`` process for tests and demos, and the PromQL of the Grafana dashboard.

``Prometheus`` runs the binary from ``$PATH`` (Debian package ``prometheus``; installed by
scripts/setup-cpu.sh) on 127.0.0.1 with a temporary storage folder and a short scrape
interval, and queries its HTTP API. ``dashboard_queries`` lists every PromQL expression of
a Grafana dashboard JSON with the Grafana variables replaced, so tests can run each one
against a real Prometheus.
"""

from __future__ import annotations

import json
import re
import shutil
import socket
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.error import URLError
from urllib.parse import urlencode
from urllib.request import urlopen

#: Metric names in a PromQL expression (every metric the dashboard uses has a prefix).
METRIC_NAME = re.compile(r"\b(?:vllm|meda):[a-zA-Z0-9_:]*[a-zA-Z0-9_]")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class PrometheusClient:
    """The few calls of Prometheus's HTTP API (``/api/v1``) the tests and scripts need."""

    def __init__(self, url: str, job: str = "vllm"):
        self.url = url.rstrip("/")
        self.job = job

    def api(self, path: str, **params: Any) -> Any:
        url = f"{self.url}/api/v1/{path}"
        if params:
            url += "?" + urlencode(params)
        with urlopen(url, timeout=30) as r:
            body = json.loads(r.read())
        if body.get("status") != "success":
            raise RuntimeError(f"prometheus {path} {params}: {body}")
        return body["data"]

    def query(self, expr: str, at: float | None = None) -> list[dict[str, Any]]:
        """Instant vector: ``[{"metric": {...}, "value": [t, "v"]}, ...]``."""
        params: dict[str, Any] = {"query": expr}
        if at is not None:
            params["time"] = f"{at:.3f}"
        data = self.api("query", **params)
        if data["resultType"] == "scalar":
            return [{"metric": {}, "value": data["result"]}]
        return data["result"]

    def query_range(self, expr: str, start: float, end: float, step: float) -> list[dict[str, Any]]:
        """Range matrix: ``[{"metric": {...}, "values": [[t, "v"], ...]}, ...]``."""
        data = self.api("query_range", query=expr, start=start, end=end, step=step)
        return data["result"]

    def value(self, expr: str, default: float = 0.0) -> float:
        """Sum of an instant query's samples (``default`` when empty)."""
        result = self.query(expr)
        if not result:
            return default
        return sum(float(r["value"][1]) for r in result)

    def wait_target_up(self, timeout: float = 60) -> None:
        deadline = time.time() + timeout
        while time.time() < deadline:
            up = self.query(f'up{{job="{self.job}"}}')
            if up and all(r["value"][1] == "1" for r in up):
                return
            time.sleep(0.5)
        raise TimeoutError(f"scrape target not up after {timeout}s: {self.api('targets')}")

    def wait_for(self, expr: str, predicate, timeout: float = 60, period: float = 0.5) -> float:
        """Poll ``value(expr)`` until ``predicate(value)``; return the value."""
        deadline = time.time() + timeout
        value = self.value(expr, default=float("nan"))
        while not predicate(value):
            if time.time() > deadline:
                raise TimeoutError(f"{expr} = {value} after {timeout}s")
            time.sleep(period)
            value = self.value(expr, default=float("nan"))
        return value


class Prometheus(PrometheusClient):
    """``with Prometheus(["127.0.0.1:8000"], workdir) as prom: prom.query("up")``."""

    def __init__(
        self,
        targets: list[str],
        workdir: str | Path,
        scrape_interval: str = "1s",
        binary: str | None = None,
        job: str = "vllm",
    ):
        self.targets = list(targets)
        self.workdir = Path(workdir)
        self.scrape_interval = scrape_interval
        self.binary = binary or shutil.which("prometheus")
        self.port = free_port()
        super().__init__(f"http://127.0.0.1:{self.port}", job)
        self.proc: subprocess.Popen | None = None

    def config(self) -> str:
        return (
            "global:\n"
            f"  scrape_interval: {self.scrape_interval}\n"
            f"  evaluation_interval: {self.scrape_interval}\n"
            "scrape_configs:\n"
            f"  - job_name: {self.job}\n"
            "    metrics_path: /metrics\n"
            "    static_configs:\n"
            f"      - targets: {json.dumps(self.targets)}\n"
        )

    def start(self, timeout: float = 60) -> Prometheus:
        if not self.binary:
            raise FileNotFoundError(
                "prometheus not found on PATH (Debian: apt-get install prometheus; "
                "scripts/setup-cpu.sh does it)"
            )
        self.workdir.mkdir(parents=True, exist_ok=True)
        cfg = self.workdir / "prometheus.yml"
        cfg.write_text(self.config())
        self.log_path = self.workdir / "prometheus.log"
        self._log = open(self.log_path, "w")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen(
            [
                self.binary,
                f"--config.file={cfg}",
                f"--storage.tsdb.path={self.workdir / 'data'}",
                f"--web.listen-address=127.0.0.1:{self.port}",
                "--storage.tsdb.retention.time=1d",
                "--log.level=warn",
            ],
            stdout=self._log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        deadline = time.time() + timeout
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"prometheus exited with {self.proc.returncode}:\n{self.tail()}")
            try:
                with urlopen(self.url + "/-/ready", timeout=2) as r:
                    if r.status == 200:
                        return self
            except (URLError, OSError):
                pass
            time.sleep(0.3)
        self.stop()
        raise TimeoutError(f"prometheus not ready after {timeout}s:\n{self.tail()}")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        if getattr(self, "_log", None):
            self._log.close()

    def tail(self, n: int = 30) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-n:])
        except OSError:
            return ""

    def __enter__(self) -> Prometheus:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


# ---- the dashboard's PromQL ----------------------------------------------------------------


@dataclass(frozen=True)
class DashboardQuery:
    panel: str
    panel_type: str
    ref: str
    expr: str  # as written in the dashboard (Grafana variables unexpanded)
    legend: str

    def promql(self, rate_interval: str = "1m", model: str = ".*") -> str:
        """The expression with Grafana's variables replaced (as Grafana would send it)."""
        return expand(self.expr, rate_interval=rate_interval, model=model)


def expand(expr: str, rate_interval: str = "1m", model: str = ".*") -> str:
    out = expr.replace("$__rate_interval", rate_interval).replace(
        "${__rate_interval}", rate_interval
    )
    out = out.replace("$__interval", rate_interval).replace("$__range", rate_interval)
    return out.replace("${model}", model).replace("$model", model)


def iter_panels(dashboard: dict[str, Any]) -> Iterator[dict[str, Any]]:
    for panel in dashboard.get("panels", []):
        yield panel
        yield from iter_panels(panel)  # rows hold nested panels


def dashboard_queries(dashboard: dict[str, Any] | str | Path) -> list[DashboardQuery]:
    """Every target expression of a dashboard (a dict, or a path to its JSON)."""
    if not isinstance(dashboard, dict):
        dashboard = json.loads(Path(dashboard).read_text())
    out = []
    for panel in iter_panels(dashboard):
        for target in panel.get("targets", []):
            if target.get("expr"):
                out.append(
                    DashboardQuery(
                        panel=panel.get("title", ""),
                        panel_type=panel.get("type", ""),
                        ref=target.get("refId", ""),
                        expr=target["expr"],
                        legend=target.get("legendFormat", ""),
                    )
                )
    return out


def metric_names(expr: str) -> set[str]:
    return set(METRIC_NAME.findall(expr))


def legend(fmt: str, labels: dict[str, str]) -> str:
    """Grafana's ``{{label}}`` legend format."""
    return re.sub(r"\{\{\s*(\w+)\s*\}\}", lambda m: labels.get(m.group(1), ""), fmt).strip()
