"""docs/dashboard.png from a real run: CPU vLLM server + real Prometheus + load, then render.

Builds the tiny random Qwen2-VL (no download), starts ``vllm serve --kv-policy meda
--kv-budget 0.2`` on the CPU with a small KV pool (so compression decides how many
requests run at once), starts the ``prometheus`` binary scraping it every second, sends
deploy/load.py's request mix for ``--duration`` seconds, and renders the Grafana
dashboard's panels from Prometheus with deploy/render_dashboard.py.

    .venv/bin/python benchmarks/dashboard_png.py --out docs/dashboard.png
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "deploy"))

import load  # noqa: E402  (deploy/load.py)
import render_dashboard  # noqa: E402  (deploy/render_dashboard.py)

from meda_vllm.testing.prometheus import Prometheus, free_port  # noqa: E402
from meda_vllm.testing.tiny_qwen2vl import SERVE_ARGS, SERVER_ENV  # noqa: E402


def start_server(model: Path, port: int, args: list[str], log: Path) -> subprocess.Popen:
    cmd = [
        str(Path(sys.executable).parent / "vllm"),
        "serve",
        str(model),
        "--served-model-name",
        "tiny-qwen2vl",
        "--port",
        str(port),
        *SERVE_ARGS,
        *args,
    ]
    proc = subprocess.Popen(
        cmd,
        stdout=open(log, "w"),  # noqa: SIM115 - lives as long as the server
        stderr=subprocess.STDOUT,
        env={**os.environ, **SERVER_ENV},
        start_new_session=True,
    )
    deadline = time.time() + 300
    while time.time() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"vllm serve exited with {proc.returncode}; see {log}")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2):
                return proc
        except OSError:
            time.sleep(1)
    stop_server(proc)
    raise TimeoutError(f"vllm serve not healthy after 300 s; see {log}")


def stop_server(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=ROOT / "docs" / "dashboard.png")
    ap.add_argument("--duration", type=float, default=240, help="seconds of load")
    ap.add_argument("--concurrency", type=int, default=8)
    ap.add_argument("--max-tokens", type=int, default=48)
    ap.add_argument(
        "--kv-cache-bytes",
        type=int,
        default=8 * 2**20,
        help="KV pool (tiny model: 1 KiB per token; 8 MiB = 255 blocks of 32 tokens)",
    )
    ap.add_argument("--server-args", default="--kv-policy meda --kv-budget 0.2")
    args = ap.parse_args(argv)

    from meda_vllm.testing.tiny_qwen2vl import ensure

    with tempfile.TemporaryDirectory(prefix="meda-dashboard-") as tmp:
        tmp = Path(tmp)
        model = ensure(tmp / "model", num_layers=2)
        port = free_port()
        server_args = [
            *args.server_args.split(),
            "--kv-cache-memory-bytes",
            str(args.kv_cache_bytes),
        ]
        print(f"[dashboard] starting vllm serve on :{port} ({' '.join(server_args)})", flush=True)
        server = start_server(model, port, server_args, tmp / "server.log")
        try:
            with Prometheus(
                [f"127.0.0.1:{port}"], tmp / "prometheus", scrape_interval="1s"
            ) as prom:
                prom.wait_target_up()
                time.sleep(10)  # a quiet baseline before the load
                start = time.time() - 10
                sent = load.run(
                    f"http://127.0.0.1:{port}",
                    args.duration,
                    args.concurrency,
                    args.max_tokens,
                    pause=6.0,
                )
                time.sleep(15)  # the load winding down
                end = time.time()
                out = render_dashboard.render(
                    prom,
                    args.out,
                    start,
                    end,
                    step=2,
                    rate_interval="15s",
                    title="meda-vllm: KV cache compression (tiny Qwen2-VL on CPU, "
                    f"{' '.join(args.server_args.split())}, {sent} requests)",
                )
                print(f"[dashboard] {sent} requests; wrote {out}", flush=True)
        finally:
            stop_server(server)


if __name__ == "__main__":
    main()
