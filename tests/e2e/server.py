"""Start and stop a real `vllm serve` (CPU build) for end-to-end tests."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import requests

from meda_vllm.testing.prometheus import free_port
from meda_vllm.testing.tiny_qwen2vl import SERVE_ARGS, SERVER_ENV

ENV = SERVER_ENV
BASE_ARGS = [*SERVE_ARGS, "--kv-cache-memory-bytes", str(64 * 1024 * 1024)]


def vllm_bin() -> str:
    return str(Path(sys.executable).parent / "vllm")


class VLLMServer:
    """``with VLLMServer(model, [...flags]) as srv: srv.url`` — logs go to ``log_path``."""

    def __init__(
        self,
        model: str | Path,
        args: list[str],
        log_path: Path,
        timeout: float = 240,
        env: dict[str, str] | None = None,
    ):
        self.model = str(model)
        self.env = dict(env or {})
        self.args = list(args)
        self.log_path = Path(log_path)
        self.timeout = timeout
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.proc: subprocess.Popen | None = None

    def command(self) -> list[str]:
        return [vllm_bin(), "serve", self.model, "--port", str(self.port), *BASE_ARGS, *self.args]

    def start(self) -> VLLMServer:
        env = {**os.environ, **ENV, **self.env}
        self.log = open(self.log_path, "w")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen(
            self.command(),
            stdout=self.log,
            stderr=subprocess.STDOUT,
            env=env,
            start_new_session=True,
        )
        deadline = time.time() + self.timeout
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"vllm serve exited with {self.proc.returncode}:\n{self.tail()}")
            try:
                if requests.get(self.url + "/health", timeout=2).status_code == 200:
                    return self
            except requests.RequestException:
                pass
            time.sleep(1)
        self.stop()
        raise TimeoutError(f"vllm serve not healthy after {self.timeout}s:\n{self.tail()}")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
        if getattr(self, "log", None):
            self.log.close()

    def tail(self, n: int = 60) -> str:
        try:
            lines = self.log_path.read_text(errors="replace").splitlines()
        except OSError:
            return ""
        return "\n".join(line for line in lines[-n:])

    def metrics(self) -> dict[str, float]:
        """Prometheus text of /metrics as {'name{labels}': value} (unlabelled keys too)."""
        text = requests.get(self.url + "/metrics", timeout=10).text
        out: dict[str, float] = {}
        for line in text.splitlines():
            if not line or line.startswith("#"):
                continue
            m = re.match(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)(\{[^}]*\})?\s+(\S+)$", line)
            if not m:
                continue
            name, _labels, value = m.groups()
            try:
                v = float(value)
            except ValueError:
                continue
            out[name] = out.get(name, 0.0) + v if name in out and _labels else v
        return out

    def info_labels(self, name: str) -> dict[str, str]:
        """Labels of an info metric, e.g. ``vllm:cache_config_info``."""
        text = requests.get(self.url + "/metrics", timeout=10).text
        for line in text.splitlines():
            if line.startswith(name + "{"):
                return dict(re.findall(r'(\w+)="([^"]*)"', line.split("}", 1)[0]))
        raise KeyError(name)

    def cache_geometry(self) -> tuple[int, int]:
        """(block_size, num_blocks) of the KV pool."""
        labels = self.info_labels("vllm:cache_config_info")
        return int(labels["block_size"]), int(labels["num_gpu_blocks"])

    def __enter__(self) -> VLLMServer:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


def run_cli(args: list[str], timeout: float = 120) -> subprocess.CompletedProcess:
    """Run `vllm ARGS` to completion (for startup-failure tests)."""
    return subprocess.run(
        [vllm_bin(), *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, **ENV},
    )
