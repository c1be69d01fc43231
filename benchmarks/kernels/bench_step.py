#!/usr/bin/env python
"""The whole compression step of one request, as the server runs it, vs its prefill.

What ``bench_kernels.py`` cannot show: the step the worker really runs after the last
prefill chunk — ``meda_vllm.paged_view.plan_paged_request`` (every layer: paged window
scores, MEDA's entropy, the policy's budgets and selection in torch, paged merging) and
``apply_plan`` (in-place compaction) — with its Python work, kernel launches and host
synchronisations, for a whole model (all layers), timed by the wall clock. The baseline,
measured in the same process, is the prefill of the same layers: QKV projection, causal
attention (SDPA), output projection and the gated MLP, in bf16. A second baseline, same
run: the same plan made layer by layer (``layer_sets=False``) instead of all layers at
once.

    python benchmarks/kernels/bench_step.py                 # GPU: writes $OUT/bench_step.*
    python benchmarks/kernels/bench_step.py --quick         # CPU smoke test (tiny model)
    python benchmarks/kernels/bench_step.py --count         # launches per request (CPU)

Needs torch, triton, pydantic and this checkout (``meda_vllm`` importable, e.g. installed
with ``pip install -e .`` or on ``PYTHONPATH`` with ``kernels/`` as ``meda_vllm/kernels``;
``benchmarks/kernels/gpu_session.sh`` sets that up). No vLLM.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
import warnings
from pathlib import Path

import torch

from meda_vllm.compress import required_query_positions
from meda_vllm.config import KVPolicyConfig
from meda_vllm.paged_view import apply_plan, plan_paged_request
from meda_vllm.testing.synthetic import paged_request

# name: (layers, query heads, kv heads, head size, hidden, MLP intermediate)
MODELS = {
    "llava-1.5-7b": (32, 32, 32, 128, 4096, 11008),
    "qwen2-vl-7b": (28, 28, 4, 128, 3584, 18944),
}
QUICK_MODELS = {"tiny-gqa": (2, 4, 2, 32, 128, 256)}
# --count --quick also counts a deeper model: the counts must not depend on the depth
QUICK_COUNT_MODELS = {**QUICK_MODELS, "tiny-gqa-8": (8, 4, 2, 32, 128, 256)}
BLOCK_SIZE = 16
BUDGET = 0.2


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def wall_ms(fn, device, reps: int, warmup: int = 1) -> float:
    """Median wall time of ``fn()`` over ``reps`` runs (device synchronised around each)."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(reps):
        sync(device)
        start = time.perf_counter()
        fn()
        sync(device)
        times.append((time.perf_counter() - start) * 1e3)
    return sorted(times)[len(times) // 2]


def prefill_ms(model, n, device, dtype, reps):
    """One decoder layer's prefill (projections, causal SDPA, gated MLP) times the layers."""
    layers, h, h_kv, d, hidden, ffn = model
    x = torch.randn(n, hidden, device=device, dtype=dtype)
    w_qkv = torch.randn(hidden, (h + 2 * h_kv) * d, device=device, dtype=dtype) * 0.02
    w_o = torch.randn(h * d, hidden, device=device, dtype=dtype) * 0.02
    w_up = torch.randn(hidden, 2 * ffn, device=device, dtype=dtype) * 0.02
    w_down = torch.randn(ffn, hidden, device=device, dtype=dtype) * 0.02

    def layer():
        qkv = x @ w_qkv
        q, k, v = qkv.split([h * d, h_kv * d, h_kv * d], dim=-1)
        q = q.view(n, h, d).transpose(0, 1)[None]
        k = k.view(n, h_kv, d).transpose(0, 1)[None]
        v = v.view(n, h_kv, d).transpose(0, 1)[None]
        attn = torch.nn.functional.scaled_dot_product_attention(
            q, k, v, is_causal=True, enable_gqa=h != h_kv
        )
        y = x + attn[0].transpose(0, 1).reshape(n, h * d) @ w_o
        gate, up = (y @ w_up).chunk(2, dim=-1)
        return y + (torch.nn.functional.silu(gate) * up) @ w_down

    return wall_ms(layer, device, reps) * layers


def step(model, n, policy, device, dtype, reps):
    layers, h, h_kv, d, _, _ = model
    req = paged_request(n, layers, h_kv, d, BLOCK_SIZE, dtype=dtype, device=device)
    caches, layouts, row, vis = req.caches, req.layouts, req.row, req.vis
    cfg = KVPolicyConfig.from_mapping({"kv_policy": policy, "kv_budget": BUDGET})
    pos = required_query_positions(cfg, n, vis.cpu()).to(device)
    rows = req.query_rows(h, pos)
    plans = [None]

    def plan(layer_sets=True):
        plans[0] = None  # keep one plan alive (merged K/V of every layer)
        plans[0] = plan_paged_request(
            caches, layouts, row, n, rows.__getitem__, pos, vis, cfg, fast=True,
            layer_sets=layer_sets,
        )  # fmt: skip

    def compact():
        if plans[0] is not None:
            apply_plan(caches, layouts, row, plans[0])

    # baseline in the same run: the same plan made layer by layer (no layer sets)
    per_layer_ms = wall_ms(lambda: plan(layer_sets=False), device, reps)
    plan_ms = wall_ms(plan, device, reps)
    compact_ms = wall_ms(compact, device, reps)  # idempotent enough: same shapes each time
    last = plans[0]
    return dict(
        plan_per_layer_ms=per_layer_ms,
        plan_ms=plan_ms,
        compact_ms=compact_ms,
        step_ms=plan_ms + compact_ms,
        kept=last.kept_tokens if last is not None else n,
        budgets=list(last.layer_budgets) if last is not None else None,
        **gpu_activity(lambda: (plan(), compact()), device),
    )


def gpu_activity(fn, device) -> dict:
    """Where a step's wall time goes besides the kernels themselves: the number of GPU
    activities (kernels, copies, memsets; torch profiler) and the time the GPU spent in
    them, and the host synchronisations (``torch.cuda.set_sync_debug_mode``), in one
    untimed run. Empty off CUDA."""
    if device.type != "cuda":
        return {}
    out = {}
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            torch.cuda.set_sync_debug_mode("warn")
            try:
                fn()
            finally:
                torch.cuda.set_sync_debug_mode(0)
        out["host_syncs"] = sum("synchroniz" in str(w.message).lower() for w in caught)
        from torch.profiler import ProfilerActivity, profile

        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            fn()
            sync(device)
        on_gpu = [e for e in prof.events() if str(getattr(e, "device_type", "")).endswith("CUDA")]
        out["gpu_activities"] = len(on_gpu)
        # time the GPU spent executing (the rest of the wall time is launches and Python)
        out["gpu_busy_ms"] = sum(e.time_range.elapsed_us() for e in on_gpu) / 1e3
    except Exception as exc:  # noqa: BLE001 - diagnostics only, never fail the benchmark
        out["activity_error"] = f"{type(exc).__name__}: {exc}"
    return out


# aten ops that launch nothing on a GPU (views, metadata, allocations) or that run only
# for CPU tensors (the kernels' value checks: ids / positions in range, via min/max + item)
NO_LAUNCH = {
    "aten.slice", "aten.view", "aten.unsqueeze", "aten.squeeze", "aten.expand",
    "aten.permute", "aten.as_strided", "aten.alias", "aten.select", "aten.lift_fresh",
    "aten._local_scalar_dense", "aten.t", "aten.transpose", "aten.detach",
    "aten._unsafe_view", "aten.reshape", "aten.min", "aten.max", "aten.empty",
    "aten.empty_like", "aten.empty_strided", "aten.split", "aten.split_with_sizes",
    "aten.chunk", "aten.unbind",
}  # fmt: skip


def count_launches(model, n, policy) -> dict:
    """Kernel launches per request of the step as the GPU path would make them, counted on
    CPU: Triton launches recorded in their GPU configuration (``meda_vllm.testing.
    launches.recording_launches``) and the torch ops that would launch a kernel (a
    ``TorchDispatchMode``; views and the CPU-only value checks excluded). The recorded
    launches write nothing (zeros), so data-dependent paths may differ from a real run."""
    import collections

    from torch.utils._python_dispatch import TorchDispatchMode

    from meda_vllm.testing.launches import recording_launches

    class Count(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.ops = collections.Counter()
            self.paused = False
            self.syncs = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            name = str(func.overloadpacket)
            if self.paused or not (name in SYNCING or name not in NO_LAUNCH):
                return func(*args, **(kwargs or {}))
            if not _in_cpu_only_check():
                self.syncs += name in SYNCING
                self.ops[name] += name not in NO_LAUNCH
            return func(*args, **(kwargs or {}))

    layers, h, h_kv, d, _, _ = model
    req = paged_request(n, layers, h_kv, d, BLOCK_SIZE, dtype=torch.bfloat16)
    cfg = KVPolicyConfig.from_mapping({"kv_policy": policy, "kv_budget": BUDGET})
    pos = required_query_positions(cfg, n, req.vis)
    rows = req.query_rows(h, pos)
    previous = os.environ.get("MEDA_KERNELS")
    os.environ["MEDA_KERNELS"] = "triton"
    count = Count()
    empty, empty_like = torch.empty, torch.empty_like

    def zeroed(make):  # recorded launches write nothing: hand out zeros, count an empty
        def alloc(*args, **kwargs):
            out = make(*args, **kwargs)
            count.paused = True
            try:
                return out.zero_()
            finally:
                count.paused = False

        return alloc

    torch.empty, torch.empty_like = zeroed(empty), zeroed(empty_like)
    try:
        with count, recording_launches() as launches:
            plan = plan_paged_request(
                req.caches, req.layouts, req.row, n, rows.__getitem__, pos, req.vis, cfg, fast=True
            )
            apply_plan(req.caches, req.layouts, req.row, plan)
    finally:
        torch.empty, torch.empty_like = empty, empty_like
        if previous is None:
            os.environ.pop("MEDA_KERNELS")
        else:
            os.environ["MEDA_KERNELS"] = previous
    torch_ops = sum(count.ops.values())
    return dict(
        triton=len(launches),
        torch_ops=torch_ops,
        triton_per_layer=len(launches) / layers,
        torch_ops_per_layer=torch_ops / layers,
        host_syncs=count.syncs,
    )


# aten ops whose result the host must wait for on a GPU
SYNCING = {"aten._local_scalar_dense", "aten.nonzero", "aten.masked_select", "aten._unique2"}


# value checks that run only for CPU tensors (kernels/layout.py, LayerView); the engine's
# once-per-request position check copies the positions to the host first (+1 sync on GPU)
CPU_ONLY_CHECKS = {
    "check_cache", "check_row", "check_positions", "check_queries", "check_query_positions",
}  # fmt: skip


def _in_cpu_only_check() -> bool:
    """Whether the op runs inside one of :data:`CPU_ONLY_CHECKS`."""
    import traceback

    return any(frame.name in CPU_ONLY_CHECKS for frame in traceback.extract_stack())


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="tiny CPU smoke run")
    ap.add_argument("--sizes", type=str, default=None, help="comma-separated N values")
    ap.add_argument("--policies", type=str, default="meda,snapkv,pyramidkv,madakv")
    ap.add_argument("--reps", type=int, default=None)
    ap.add_argument("--out", type=str, default=os.environ.get("OUT", "./bench_out"))
    ap.add_argument(
        "--count",
        action="store_true",
        help="count the launches per request the GPU path makes (runs on CPU, no timing)",
    )
    args = ap.parse_args(argv)
    if args.count:
        sizes = [int(x) for x in args.sizes.split(",")] if args.sizes else [2048]
        models = QUICK_COUNT_MODELS if args.quick else MODELS
        for name, model in models.items():
            for n in sizes:
                for policy in [p for p in args.policies.split(",") if p]:
                    c = count_launches(model, n, policy)
                    print(
                        f"{name} ({model[0]} layers) N={n} {policy:10s} per request: "
                        f"{c['triton']} Triton launches, ~{c['torch_ops']} torch kernel ops, "
                        f"{c['host_syncs']} host syncs (per layer: "
                        f"{c['triton_per_layer']:.2f} + ~{c['torch_ops_per_layer']:.1f})"
                    )
        return 0
    if args.quick:
        device, models, sizes, reps = torch.device("cpu"), QUICK_MODELS, [300], 2
        dtype = torch.float32
    else:
        if not torch.cuda.is_available():
            print("no CUDA device: use --quick for the CPU smoke run", file=sys.stderr)
            return 2
        device, models, sizes, reps = torch.device("cuda"), MODELS, [2048, 8192, 32768], 5
        dtype = torch.bfloat16
    sizes = [int(x) for x in args.sizes.split(",")] if args.sizes else sizes
    reps = args.reps or reps
    policies = [p for p in args.policies.split(",") if p]
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    env = dict(
        device=torch.cuda.get_device_name(device) if device.type == "cuda" else platform.machine(),
        torch=torch.__version__,
        dtype=str(dtype),
        budget=BUDGET,
        block_size=BLOCK_SIZE,
        kernels=os.environ.get("MEDA_KERNELS", "auto"),
    )
    print(f"device {env['device']} | torch {env['torch']} | {dtype} | budget {BUDGET}")
    results = []
    started = time.time()
    for n in sizes:
        for name, model in models.items():
            base = prefill_ms(model, n, device, dtype, reps)
            print(f"\n== {name} N={n}: prefill of {model[0]} layers {base:9.2f} ms")
            for policy in policies:
                r = step(model, n, policy, device, dtype, reps)
                r.update(model=name, n=n, policy=policy, prefill_ms=base)
                r["step_over_prefill"] = r["step_ms"] / base
                results.append(r)
                activity = (
                    f", {r['gpu_activities']} GPU activities busy {r['gpu_busy_ms']:.2f} ms,"
                    f" {r['host_syncs']} host syncs"
                    if "gpu_activities" in r
                    else ""
                )
                print(
                    f"{policy:10s} (layer by layer: plan {r['plan_per_layer_ms']:8.2f} ms) "
                    f"plan {r['plan_ms']:8.2f} ms + compact {r['compact_ms']:7.2f} ms"
                    f" = {r['step_ms']:8.2f} ms = {r['step_over_prefill']:6.2%} of prefill"
                    f" (kept {r['kept']} of {n}{activity})"
                )
                report = dict(env=env, results=results, wall_s=time.time() - started)
                (out_dir / "bench_step.json").write_text(json.dumps(report, indent=2))
                (out_dir / "bench_step.md").write_text(markdown(report))
                if device.type == "cuda":
                    torch.cuda.empty_cache()
    print(f"\nwrote {out_dir / 'bench_step.json'} and .md in {time.time() - started:.1f} s")
    return 0


def markdown(report) -> str:
    env = report["env"]
    lines = [
        f"# Compression step vs prefill ({env['device']}, torch {env['torch']}, {env['dtype']})",
        "",
        f"Budget {env['budget']}, block size {env['block_size']}; wall clock, median of runs; "
        "prefill = projections + causal SDPA + gated MLP of every layer, same process.",
        "",
        "plan = all layers as one layer set (the server's path); plan, layer by layer = the "
        "same plan without layer sets (baseline, same run).",
        "",
        "| model | N | policy | plan, layer by layer (ms) | plan (ms) | compact (ms) | "
        "step (ms) | prefill (ms) | step / prefill | kept | GPU activities | GPU busy (ms) | "
        "host syncs |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in report["results"]:
        lines.append(
            f"| {r['model']} | {r['n']} | {r['policy']} | {r['plan_per_layer_ms']:.2f} | "
            f"{r['plan_ms']:.2f} | "
            f"{r['compact_ms']:.2f} | {r['step_ms']:.2f} | {r['prefill_ms']:.2f} | "
            f"{r['step_over_prefill']:.2%} | {r['kept']} | {r.get('gpu_activities', '')} | "
            f"{format(r['gpu_busy_ms'], '.2f') if 'gpu_busy_ms' in r else ''} | "
            f"{r.get('host_syncs', '')} |"
        )
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
