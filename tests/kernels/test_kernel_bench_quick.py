"""The GPU benchmark script's --quick CPU mode runs end to end (kernels in the interpreter)."""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

NEEDS_INTERPRETER = False  # the script runs in its own process
SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "kernels" / "bench_kernels.py"


def test_bench_quick(tmp_path):
    env = dict(os.environ, OUT=str(tmp_path), TRITON_INTERPRET="1")
    env.pop("MEDA_KERNELS", None)
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), "--quick", "--sizes", "40", "--tune", "40"],
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
    names = {"window_scores", "entropy", "scores_entropy", "merge", "compact", "topk", "pool"}
    assert names <= set(ops)
    assert all(o["x_roofline"] > 0 and o["kernel_bytes"] >= o["min_bytes"] for o in ops.values())
    assert {t["var"] for t in report["tuning"]} == {"MEDA_DOT_TILES", "MEDA_MATCH_TILES"}
    assert all("error" not in t for t in report["tuning"])
    md = (tmp_path / "bench_kernels.md").read_text()
    assert "compression step" in md and "MEDA_MATCH_TILES" in md


def test_roofline_mode_needs_no_gpu():
    """``--roofline`` prints the traffic/FLOP models' lower bounds; merging dominates MHA."""
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), "--roofline", "3000,690", "--sizes", "8192"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = [line.split("|") for line in proc.stdout.splitlines() if "| 8192 |" in line]
    assert [r[1].strip() for r in rows] == ["llava-1.5-7b", "qwen2-vl-7b"]
    for r in rows:
        scores, entropy, both, merge, compact = (float(c.split()[0]) for c in r[3:8])
        step = float(r[8].split()[0])
        assert abs(step - (both + merge + compact)) <= 2
        assert max(scores, entropy) <= both <= scores + entropy
    llava = [float(c.split()[0]) for c in rows[0][3:8]]
    # LLaVA reads K for both in one statistics pass (memory-bound): one read less
    assert llava[2] < llava[0] + llava[1]
    # LLaVA (MHA, 32 KV heads): the all-pairs merge match costs more than everything else
    assert llava[3] > llava[2] + llava[4]


def test_benchmark_samples_entropy_rows_as_the_server():
    """The benchmark's MEDA entropy rows are the ones the server reads (default config),
    and that sample stays bounded: the entropy pass is linear in N."""
    import importlib.util

    import torch

    from meda_vllm.config import KVPolicyConfig
    from meda_vllm.policies import build_policy
    from meda_vllm.testing.synthetic import synthetic_vis

    spec = importlib.util.spec_from_file_location("bench_kernels_mod", SCRIPT)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    policy = build_policy(KVPolicyConfig(kv_policy="meda", kv_window=bench.WINDOW))
    for n in (40, 2048, 32768):
        vis = synthetic_vis(n)
        assert torch.equal(bench.entropy_positions(n, vis), policy.entropy_positions(n, vis))
    rows = bench.entropy_positions(32768, synthetic_vis(32768)).numel()
    assert rows <= bench.WINDOW + 128


STEP_SCRIPT = SCRIPT.parent / "bench_step.py"


def test_bench_step_quick_through_the_interpreted_kernels(tmp_path):
    """The whole-step benchmark runs the worker's planning + compaction (Triton kernels in
    the interpreter, as MEDA_KERNELS=triton makes the GPU path run on CPU)."""
    env = dict(os.environ, OUT=str(tmp_path), TRITON_INTERPRET="1", MEDA_KERNELS="triton")
    proc = subprocess.run(
        [sys.executable, str(STEP_SCRIPT), "--quick", "--policies", "meda,snapkv"],
        env=env,
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    report = json.loads((tmp_path / "bench_step.json").read_text())
    assert report["env"]["kernels"] == "triton"
    rows = {r["policy"]: r for r in report["results"]}
    assert set(rows) == {"meda", "snapkv"}
    for r in rows.values():
        assert 0 < r["kept"] < r["n"] and r["step_ms"] > 0 and r["prefill_ms"] > 0
        assert r["step_ms"] == r["plan_ms"] + r["compact_ms"]
    assert sum(rows["meda"]["budgets"]) == 2 * 60  # two layers, 0.2 * 300 tokens each
    assert "step / prefill" in (tmp_path / "bench_step.md").read_text()


def test_launch_budget_per_request():
    """What the GPU path launches per request (counted on CPU): a guard against the step
    growing launches, which at small N cost more than the kernels themselves. Layer sets
    make the count independent of the number of layers (2 and 8 here, 28-32 for 7B)."""
    proc = subprocess.run(
        [sys.executable, str(STEP_SCRIPT), "--count", "--quick", "--sizes", "300",
         "--policies", "meda,snapkv,pyramidkv"],
        env={k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"},
        capture_output=True,
        text=True,
        timeout=300,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    counts = {}
    pattern = re.compile(
        r"\((\d+) layers\) N=\d+ (\w+) .*?(\d+) Triton launches, ~(\d+) torch.*?(\d+) host"
    )
    for line in proc.stdout.splitlines():
        m = pattern.search(line)
        counts[m.group(2), int(m.group(1))] = tuple(int(m.group(i)) for i in (3, 4, 5))
    assert set(counts) == {(p, n) for p in ("meda", "snapkv", "pyramidkv") for n in (2, 8)}
    for policy in ("meda", "snapkv", "pyramidkv"):
        assert counts[policy, 2] == counts[policy, 8], policy  # nothing per layer
    # scores + entropy (4: one shared statistics launch) + merge (gather, match,
    # accumulate) + compact write
    assert counts["meda", 8][0] == 8 and counts["meda", 8][1] <= 80
    for policy in ("snapkv", "pyramidkv"):  # scores + compaction (gather, write)
        assert counts[policy, 8][0] == 5 and counts[policy, 8][1] <= 35
    # host synchronisations per request (MEDA: score rows, entropy rows, all layers'
    # entropies in one copy)
    assert counts["meda", 8][2] <= 3 and counts["snapkv", 8][2] <= 1
