"""The GPU benchmark script's --quick CPU mode runs end to end (kernels in the interpreter)."""

import json
import os
import subprocess
import sys
from pathlib import Path

NEEDS_INTERPRETER = False  # the script runs in its own process
SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "kernels" / "bench_kernels.py"


def test_bench_quick(tmp_path):
    env = dict(os.environ, OUT=str(tmp_path), TRITON_INTERPRET="1")
    env.pop("MEDA_KERNELS", None)
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), "--quick", "--sizes", "40"],
        env=env,
        cwd=tmp_path,  # the script must find the kernels without the caller's cwd
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    report = json.loads((tmp_path / "bench_kernels.json").read_text())
    assert report["all_correct"] and report["env"]["backend"] == "triton"
    assert {r["model"] for r in report["results"]} == {"tiny-mha", "tiny-gqa"}
    ops = report["results"][0]["ops"]
    assert {"window_scores", "entropy", "merge", "compact", "topk", "pool"} <= set(ops)
    assert "compression step" in (tmp_path / "bench_kernels.md").read_text()
