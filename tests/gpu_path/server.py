"""`vllm serve` on vLLM's GPU code path (Model Runner V2 + TRITON_ATTN), run on CPU.

Wraps ``tests.e2e.server.VLLMServer``: same command line and lifecycle, plus the test
shim in ``shim/`` on ``PYTHONPATH`` (a stub Triton "cpu" backend and a general plugin
that lets ``--attention-backend TRITON_ATTN`` through on the CPU platform) and
``TRITON_INTERPRET=1``, so every Triton kernel, vLLM's and meda's, runs in Triton's
interpreter on CPU tensors. That costs ~1.2 s per decode step on 2 cores: keep prompts,
``max_tokens`` and request counts small.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from tests.e2e.server import VLLMServer

SHIM = Path(__file__).resolve().parent / "shim"
COUNTS_ENV = "MEDA_GPU_PATH_KERNEL_COUNTS"

#: Appended after tests.e2e.server.BASE_ARGS (argparse: the last value wins): a small
#: pool, so one short request shows in ``vllm:kv_cache_usage_perc``. Block size stays 32
#: (CPU_ATTN needs a multiple of 32).
CPU_PATH_ARGS = [
    "--max-model-len",
    "1024",
    "--max-num-seqs",
    "2",
    "--kv-cache-memory-bytes",
    str(8 * 1024 * 1024),
    "--limit-mm-per-prompt",
    '{"image": 1, "video": 0}',
]
#: The GPU path: TRITON_ATTN asked for explicitly (the CPU platform otherwise picks
#: CPU_ATTN) and 16-token blocks (finer KV accounting for short prompts).
GPU_PATH_ARGS = [*CPU_PATH_ARGS, "--attention-backend", "TRITON_ATTN", "--block-size", "16"]


def gpu_path_env(counts_dir: Path) -> dict[str, str]:
    path = os.pathsep.join(p for p in (str(SHIM), os.environ.get("PYTHONPATH", "")) if p)
    return {
        "PYTHONPATH": path,
        "TRITON_INTERPRET": "1",
        "VLLM_USE_V2_MODEL_RUNNER": "1",
        # meda's own kernels in Triton too (the CPU default is their torch references).
        "MEDA_KERNELS": "triton",
        COUNTS_ENV: str(counts_dir / "{pid}.json"),
    }


class GpuPathServer:
    """``GpuPathServer(model, [...flags], log_path, counts_dir).start()``; then ``.url``,
    ``.metrics()``, ``.tail()``, ``.log_text()``, ``.worker_record()``, ``.stop()``."""

    def __init__(
        self,
        model: str | Path,
        args: list[str],
        log_path: Path,
        counts_dir: Path,
        timeout: float = 300,
    ):
        self.counts_dir = Path(counts_dir)
        self.counts_dir.mkdir(parents=True, exist_ok=True)
        for stale in self.counts_dir.glob("*.json"):
            stale.unlink()
        self.env = gpu_path_env(self.counts_dir)
        self.server = VLLMServer(model, [*GPU_PATH_ARGS, *args], log_path, timeout=timeout)
        base_command = self.server.command
        # VLLMServer passes os.environ to the child; `env` adds ours for this server only.
        self.server.command = lambda: [
            "env",
            *(f"{k}={v}" for k, v in self.env.items()),
            *base_command(),
        ]

    def __getattr__(self, name: str):
        return getattr(self.server, name)

    def start(self) -> GpuPathServer:
        self.server.start()
        return self

    def stop(self) -> None:
        self.server.stop()

    def log_text(self) -> str:
        return self.server.log_path.read_text(errors="replace")

    def records(self) -> list[dict]:
        """What each shim-loaded process wrote (see shim/meda_gpu_path_shim.py)."""
        out = []
        for path in sorted(self.counts_dir.glob("*.json")):
            try:
                out.append(json.loads(path.read_text()))
            except (OSError, ValueError):
                continue  # a process is rewriting it (atomically); read the others
        return out

    def worker_record(self) -> dict:
        """The record of the process that holds the model runner."""
        workers = [r for r in self.records() if "runner" in r]
        if len(workers) != 1:
            raise AssertionError(
                f"expected one worker record in {self.counts_dir}, got {len(workers)}: "
                "was the shim loaded (PYTHONPATH, TRITON_INTERPRET=1)?\n" + self.tail()
            )
        return workers[0]

    def __enter__(self) -> GpuPathServer:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
