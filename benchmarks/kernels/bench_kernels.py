#!/usr/bin/env python
"""Benchmark meda-vllm's KV-compression kernels against copy bandwidth and prefill attention.

GPU run (H100/H200, torch + triton only, no vLLM needed, package need not be installed):

    python benchmarks/kernels/bench_kernels.py            # writes $OUT (default ./bench_out)

For LLaVA-1.5-7B (32 q / 32 kv heads) and Qwen2-VL-7B (28 q / 4 kv heads) geometry, D=128,
bf16, block size 16 (shuffled blocks), window 32, N in 2K/8K/32K, it

1. measures copy bandwidth (``torch.clone`` of a 1 GiB tensor) with ``triton.testing.do_bench``;
2. checks every kernel against its torch reference at that size;
3. times every op and prints achieved GB/s (bytes the op must move, see
   docs/KERNELS.md) and the ratio to copy bandwidth;
4. times one layer's prefill attention (``scaled_dot_product_attention``, causal, same
   geometry) and prints the compression step (scores + pool + entropy + topk + merge +
   compact) as a fraction of it.

``--quick`` is a CPU smoke test with tiny sizes through the torch references (or through
the Triton interpreter when ``TRITON_INTERPRET=1``), so that the script itself is tested.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
import os
import platform
import sys
import time
import types
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[2]


def load_kernels():
    """Import ``meda_vllm.kernels`` from the repo's ``kernels/`` folder.

    Works whether or not the package is installed, and never runs ``meda_vllm/__init__``:
    ``meda_vllm`` is registered as a bare parent over the repo's ``meda_vllm/`` folder,
    so that torch-only core modules (``modality``) import too.
    """
    if "meda_vllm.kernels" in sys.modules:
        return sys.modules["meda_vllm.kernels"]
    folder = ROOT / "kernels"
    if "meda_vllm" not in sys.modules:
        parent = types.ModuleType("meda_vllm")
        parent.__path__ = [str(ROOT / "meda_vllm")]
        sys.modules["meda_vllm"] = parent
    spec = importlib.util.spec_from_file_location(
        "meda_vllm.kernels", folder / "__init__.py", submodule_search_locations=[str(folder)]
    )
    module = importlib.util.module_from_spec(spec)
    sys.modules["meda_vllm.kernels"] = module
    spec.loader.exec_module(module)
    return module


K = load_kernels()
from meda_vllm.merging import merge_into_kept  # noqa: E402
from meda_vllm.modality import entropy_query_positions  # noqa: E402
from meda_vllm.selection import pool_scores  # noqa: E402
from meda_vllm.testing.synthetic import paged_request, synthetic_vis  # noqa: E402

GEOMETRIES = {
    # name: (query heads, kv heads, head size)
    "llava-1.5-7b": (32, 32, 128),
    "qwen2-vl-7b": (28, 4, 128),
}
QUICK_GEOMETRIES = {"tiny-mha": (4, 4, 32), "tiny-gqa": (8, 2, 32)}
BLOCK_SIZE = 16
WINDOW = 32
RHO = 0.2
POOL_KERNEL = 7
# KVPolicyConfig's defaults (kv_meda_visual_stride, kv_meda_visual_rows; a test checks
# them), not imported: the config needs pydantic, this script only torch and Triton
VIS_STRIDE, VIS_ROWS = 8, 128


def entropy_positions(n: int, vis: torch.Tensor) -> torch.Tensor:
    """MEDA's entropy rows with the default sample (window text rows + a stride of visual
    rows, at most ``VIS_ROWS`` of them), as the server picks them."""
    return entropy_query_positions(n, vis, WINDOW, VIS_STRIDE, VIS_ROWS)


# ---------------------------------------------------------------------- timing
def make_timer(quick: bool):
    if quick:

        def timer(fn):
            fn()
            start = time.perf_counter()
            reps = 3
            for _ in range(reps):
                fn()
            return (time.perf_counter() - start) / reps * 1e3

        return timer
    import triton.testing

    def timer(fn):
        return triton.testing.do_bench(fn, warmup=25, rep=100)

    return timer


def copy_bandwidth(timer, device, quick: bool) -> float:
    """GB/s of ``clone`` (bytes read + written)."""
    numel = (1 << 20) if quick else (1 << 29)  # 1 GiB of bf16 on GPU
    x = torch.empty(numel, dtype=torch.bfloat16, device=device).normal_()
    ms = timer(lambda: x.clone())
    return 2 * x.numel() * x.element_size() / (ms * 1e-3) / 1e9


# ---------------------------------------------------------------------- problem setup
def build_problem(h, h_kv, d, n, device, dtype, seed=0):
    # NHD pages, shuffled block ids, one image/video span from 5 % to 90 % of the prompt
    req = paged_request(n, 1, h_kv, d, BLOCK_SIZE, dtype=dtype, device=device, seed=seed)
    cache, layout, row, vis = req.caches[0], req.layouts[0], req.row, req.vis.cpu()
    gen = torch.Generator(device="cpu").manual_seed(seed)
    window = min(WINDOW, n)
    q_win = (torch.randn(h, window, d, generator=gen) * 2).to(dtype).to(device)
    q_win_pos = torch.arange(n - window, n, device=device)
    ent_pos = entropy_positions(n, vis)  # sorted
    q_ent = (torch.randn(h, ent_pos.numel(), d, generator=gen) * 2).to(dtype).to(device)
    return dict(
        cache=cache,
        layout=layout,
        row=row,
        n=n,
        window=window,
        q_win=q_win,
        q_win_pos=q_win_pos,
        q_ent=q_ent,
        ent_pos=ent_pos.to(device),
        # MEDA's plan: window rows then entropy rows, one statistics launch for both
        q_both=torch.cat([q_win, q_ent], dim=1),
        pos_both=torch.cat([q_win_pos, ent_pos.to(device)]),
        vis=vis.to(device),
        budget=max(window, math.ceil(RHO * n)),
    )


def select_kept(pooled, budget, window):
    """Window + top-(budget - window) by pooled score; ascending positions per head."""
    s = pooled.clone()
    s[:, s.shape[1] - window :] = float("inf")
    return torch.topk(s, budget, dim=1).indices.sort(dim=1).values


def clone_cache(cache):
    return cache.permute(0, 2, 1, 3).clone().permute(0, 2, 1, 3)


# ---------------------------------------------------------------------- correctness
def max_err(a, b):
    return (a.float() - b.float()).abs().max().item() if a.numel() else 0.0


def check_all(p, backend):
    """Compare every op (``backend``) with its torch reference; returns a dict of results."""
    c, lay, row, n = p["cache"], p["layout"], p["row"], p["n"]
    res = {}
    k, v = K.gather_kv(c, lay, row, n, backend=backend)
    kr, vr = K.gather_kv_reference(c, lay, row, n)
    res["gather"] = dict(ok=bool(torch.equal(k, kr) and torch.equal(v, vr)), max_err=0.0)

    s = K.paged_window_scores(p["q_win"], p["q_win_pos"], c, lay, row, n, backend=backend)
    sr = K.paged_window_scores(p["q_win"], p["q_win_pos"], c, lay, row, n, backend="torch")
    err = max_err(s, sr)
    res["window_scores"] = dict(ok=err <= 1e-4 + 1e-3 * sr.abs().max().item(), max_err=err)

    pr = pool_scores(sr, "max", POOL_KERNEL)  # the policies' torch pooling (no kernel)

    args = (p["q_ent"], p["ent_pos"], c, lay, row, n, p["vis"])
    e = K.paged_cross_modal_entropy(*args, backend=backend)
    er = K.paged_cross_modal_entropy(*args, backend="torch")
    err = max_err(e, er)
    res["entropy"] = dict(ok=err <= 1e-3, max_err=err, value=e.tolist())

    fs, fe = K.paged_scores_and_entropy(
        p["q_both"], p["pos_both"], p["window"], c, lay, row, n, p["vis"], backend=backend
    )
    err = max(max_err(fs, sr), max_err(fe, er))
    tol = 1e-3 + 1e-3 * sr.abs().max().item()
    res["scores_entropy"] = dict(ok=err <= tol, max_err=err)

    kept = select_kept(pr, p["budget"], p["window"])
    _, match = K.merge_match(c, lay, row, n, kept, backend=backend)
    evicted_r, match_r = K.merge_match(c, lay, row, n, kept, backend="torch")  # slow part: once
    agree = (match == match_r).float().mean().item() if match.numel() else 1.0
    mk, mv = K.paged_merge(c, lay, row, n, kept, "average", backend=backend)
    kd, vd = K.gather_kv(c, lay, row, n, backend="torch")
    rk, rv = merge_into_kept(kd, vd, kept.long(), evicted_r, match_r)
    # fp32 near-ties may pick another (equally similar) target for a handful of tokens
    bad = ((mk.float() - rk.float()).abs() > 2e-2 + 1.6e-2 * rk.float().abs()).any(-1)
    bad |= ((mv.float() - rv.float()).abs() > 2e-2 + 1.6e-2 * rv.float().abs()).any(-1)
    bad_frac = bad.float().mean().item()
    res["merge"] = dict(
        ok=agree >= 0.999 and bad_frac <= 1e-3,
        match_agreement=agree,
        rows_off=bad_frac,
        max_err=max(max_err(mk, rk), max_err(mv, rv)),
    )

    for name, new in (("compact", (rk, rv)), ("compact_gather", (None, None))):
        a, b = clone_cache(c), clone_cache(c)
        K.compact_(a, lay, row, kept, *new, backend=backend)
        K.compact_reference_(b, lay, row, kept, *new)
        res[name] = dict(ok=bool(torch.equal(a, b)), max_err=max_err(a, b))
    return res, kept, pr


# ---------------------------------------------------------------------- traffic models
def shape_of(p, h, kept_count):
    """The numbers the traffic and FLOP models need, from a built problem."""
    return dict(
        n=p["n"],
        h=h,
        h_kv=p["cache"].shape[1],
        d=p["layout"].head_size,
        rows_win=p["q_win"].shape[1],
        rows_ent=p["q_ent"].shape[1],
        kept=kept_count,
        elem=p["cache"].element_size(),
    )


def bytes_model(sh):
    """Per op: (bytes any implementation must move, bytes our kernels move).

    ``kv`` is one of K or V for all ``n`` tokens, ``kk`` for the kept ones. Window scores
    read K twice (row statistics, then probabilities: docs/KERNELS.md); merging gathers
    the kept K/V (4 kk), scans evicted + kept K once for the match (kv) and reads every
    evicted K/V plus the kept ones again to accumulate (2 kv + 2 kk); compaction from the
    cache stages the kept tokens through a workspace (twice the minimum).
    """
    n, h_kv, d, elem, kept = sh["n"], sh["h_kv"], sh["d"], sh["elem"], sh["kept"]
    kv = n * h_kv * d * elem
    kk = kept * h_kv * d * elem
    scores = n * h_kv * 4
    return {
        "gather": (4 * kv, 4 * kv),
        "window_scores": (kv + scores, 2 * kv + scores),
        "pool": (2 * scores, 2 * scores),
        "entropy": (kv + n, kv + n),
        "scores_entropy": (kv + scores + n, 2 * kv + scores + n),  # one statistics pass
        "topk": (scores + kept * h_kv * 8, scores + kept * h_kv * 8),
        "merge": (2 * kv + 2 * kk, 3 * kv + 6 * kk),
        "compact": (4 * kk, 4 * kk),
        "compact_gather": (4 * kk, 8 * kk),
    }


def flops_model(sh):
    """Matrix-multiply FLOPs of the ops that have any (2 per multiply-add)."""
    n, h, h_kv, d, kept = sh["n"], sh["h"], sh["h_kv"], sh["d"], sh["kept"]
    out = {
        "window_scores": 2 * (2 * h * sh["rows_win"] * n * d),  # q.k in both passes
        "entropy": 2 * h * sh["rows_ent"] * n * d,
        "merge": 2 * h_kv * (n - kept) * kept * d,  # all-pairs cosine match
    }
    out["scores_entropy"] = out["window_scores"] + out["entropy"]
    return out


def attention_flops(n, h, d):
    """Causal prefill attention of one layer: half of QK^T and PV (4*h*n^2*d)."""
    return 2 * h * n * n * d


def roofline_ms(min_bytes, flops, gbps, tflops):
    return max(min_bytes / (gbps * 1e9), flops / (tflops * 1e12)) * 1e3


def time_ops(p, kept, pooled, backend, timer, only=None):
    c, lay, row, n = p["cache"], p["layout"], p["row"], p["n"]
    merged = K.paged_merge(c, lay, row, n, kept, "average", backend=backend)
    scratch = clone_cache(c)
    ops = {
        "gather": lambda: K.gather_kv(c, lay, row, n, backend=backend),
        "window_scores": lambda: K.paged_window_scores(
            p["q_win"], p["q_win_pos"], c, lay, row, n, backend=backend
        ),
        "pool": lambda: pool_scores(pooled, "max", POOL_KERNEL),
        "entropy": lambda: K.paged_cross_modal_entropy(
            p["q_ent"], p["ent_pos"], c, lay, row, n, p["vis"], backend=backend
        ),
        "scores_entropy": lambda: K.paged_scores_and_entropy(
            p["q_both"], p["pos_both"], p["window"], c, lay, row, n, p["vis"], backend=backend
        ),
        "topk": lambda: select_kept(pooled, p["budget"], p["window"]),
        "merge": lambda: K.paged_merge(c, lay, row, n, kept, "average", backend=backend),
        # idempotent: always writes the same values into slots [0, P)
        "compact": lambda: K.compact_(scratch, lay, row, kept, *merged, backend=backend),
        "compact_gather": lambda: K.compact_(scratch, lay, row, kept, backend=backend),
    }
    return {name: timer(fn) for name, fn in ops.items() if only is None or name in only}


def prefill_attention_ms(h, h_kv, d, n, device, dtype, timer):
    """One layer's causal prefill attention over n tokens (K/V expanded to all heads:
    the same FLOPs a GQA-aware FlashAttention performs)."""
    q = torch.randn(1, h, n, d, device=device, dtype=dtype)
    k = torch.randn(1, h_kv, n, d, device=device, dtype=dtype)
    v = torch.randn_like(k)
    k = k.repeat_interleave(h // h_kv, dim=1)
    v = v.repeat_interleave(h // h_kv, dim=1)
    fn = lambda: torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)
    return timer(fn)


def gemm_tflops(device, dtype, timer, quick: bool) -> float:
    """Measured dense GEMM throughput: the compute roof of the same run."""
    m = 256 if quick else 8192
    a = torch.randn(m, m, device=device, dtype=dtype)
    b = torch.randn(m, m, device=device, dtype=dtype)
    return 2 * m**3 / (timer(lambda: a @ b) * 1e-3) / 1e12


# MEDA's step as the server runs it: window scores and entropy in one statistics launch
STEP_OPS = ("scores_entropy", "pool", "topk", "merge", "compact")
# MEDA_DOT_TILES (window scores + entropy) and MEDA_MATCH_TILES (merge) candidates for
# --tune: each compiles without register spills for sm_90a with Triton 3.6 and 3.9
# (scripts/compile-check-triton.sh with the variable set); the first is the default.
TUNE = {
    "MEDA_DOT_TILES": ["128,32,8", "64,64,8", "64,32,8", "128,64,8", "256,32,8"],
    "MEDA_MATCH_TILES": ["128,64,8", "64,64,4", "64,64,8", "128,128,8", "64,128,8", "128,32,8"],
}
TUNE_OPS = {
    "MEDA_DOT_TILES": ("window_scores", "entropy", "scores_entropy"),
    "MEDA_MATCH_TILES": ("merge",),
}


def tune(p, kept, pooled, backend, timer, quick=False):
    """Time the tile-size candidates of the ``tl.dot`` kernels on one problem.

    (The interpreter ignores the variables: ``--quick`` only checks that this runs.)"""
    rows = []
    for var, candidates in TUNE.items():
        for value in candidates[:1] if quick else candidates:
            os.environ[var] = value
            try:
                times = time_ops(p, kept, pooled, backend, timer, only=TUNE_OPS[var])
                rows.append(dict(var=var, tiles=value, **times))
            except Exception as exc:  # noqa: BLE001 - a candidate may fail to launch
                rows.append(dict(var=var, tiles=value, error=f"{type(exc).__name__}: {exc}"))
            finally:
                os.environ.pop(var, None)
    return rows


def roofline_table(gbps: float, tflops: float, sizes) -> str:
    """Lower bounds from the traffic/FLOP models alone (no GPU): where the time must go."""
    lines = [
        f"Lower bounds at {gbps:.0f} GB/s and {tflops:.0f} TFLOP/s (models, not measurements)",
        "",
        "| model | N | scores | entropy | scores + entropy | merge | compact | step | attention "
        "| step/attn |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name, (h, h_kv, d) in GEOMETRIES.items():
        for n in sizes:
            kept = max(WINDOW, math.ceil(RHO * n))
            rows_ent = entropy_positions(n, synthetic_vis(n)).numel()
            sh = dict(n=n, h=h, h_kv=h_kv, d=d, rows_win=WINDOW, rows_ent=rows_ent, kept=kept)
            sh["elem"] = 2
            traffic, flops = bytes_model(sh), flops_model(sh)
            ops = ("window_scores", "entropy", "scores_entropy", "merge", "compact")
            lb = {op: roofline_ms(traffic[op][0], flops.get(op, 0), gbps, tflops) for op in ops}
            step = lb["scores_entropy"] + lb["merge"] + lb["compact"]  # MEDA's step
            attn = attention_flops(n, h, d) / (tflops * 1e12) * 1e3
            cells = " | ".join(f"{lb[op] * 1e3:.0f} us" for op in ops)
            lines.append(
                f"| {name} | {n} | {cells} | {step * 1e3:.0f} us | {attn * 1e3:.0f} us | "
                f"{step / attn:.1%} |"
            )
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------------- main
def main(argv=None) -> int:
    global VIS_ROWS
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="tiny CPU smoke run")
    ap.add_argument("--sizes", type=str, default=None, help="comma-separated N values")
    ap.add_argument("--out", type=str, default=os.environ.get("OUT", "./bench_out"))
    ap.add_argument(
        "--tune", type=int, default=None, metavar="N", help="also sweep tile sizes at this N"
    )
    ap.add_argument(
        "--roofline",
        type=str,
        default=None,
        metavar="GBPS,TFLOPS",
        help="print the models' lower bounds for this bandwidth and GEMM peak; no GPU needed",
    )
    ap.add_argument(
        "--visual-rows",
        type=int,
        default=VIS_ROWS,
        metavar="R",
        help=f"MEDA's entropy sample cap, kv_meda_visual_rows (default {VIS_ROWS}; 0: none)",
    )
    args = ap.parse_args(argv)
    VIS_ROWS = args.visual_rows
    if args.sizes:
        sizes = [int(x) for x in args.sizes.split(",")]
    if args.roofline:
        gbps, tflops = (float(x) for x in args.roofline.split(","))
        print(roofline_table(gbps, tflops, sizes if args.sizes else [2048, 8192, 32768]), end="")
        return 0

    quick = args.quick
    if quick:
        device = torch.device("cpu")
        interp = os.environ.get("TRITON_INTERPRET", "0") == "1"
        backend = "triton" if interp else "torch"
        geometries = QUICK_GEOMETRIES
        default_sizes = [40, 100]
    else:
        if not torch.cuda.is_available():
            print("no CUDA device: use --quick for the CPU smoke run", file=sys.stderr)
            return 2
        device = torch.device("cuda")
        backend = "triton"
        geometries = GEOMETRIES
        default_sizes = [2048, 8192, 32768]
    sizes = sizes if args.sizes else default_sizes
    dtype = torch.bfloat16
    timer = make_timer(quick)
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    started = time.time()

    import triton

    env = dict(
        device=(
            torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor()
        ),
        torch=torch.__version__,
        triton=triton.__version__,
        backend=backend,
        quick=quick,
        dtype=str(dtype),
        block_size=BLOCK_SIZE,
        window=WINDOW,
        rho=RHO,
    )
    copy_gbps = copy_bandwidth(timer, device, quick)
    peak_tflops = gemm_tflops(device, dtype, timer, quick)
    print(f"device {env['device']} | torch {env['torch']} | triton {env['triton']}")
    print(f"copy bandwidth (clone): {copy_gbps:8.1f} GB/s | bf16 GEMM: {peak_tflops:.1f} TFLOP/s")

    results = []
    tuning = []
    all_ok = True

    def save():
        """Written after every problem, so a run cut short still leaves its results."""
        report = dict(
            env=env,
            copy_gbps=copy_gbps,
            gemm_tflops=peak_tflops,
            results=results,
            tuning=tuning,
            all_correct=all_ok,
            wall_s=time.time() - started,
        )
        (out_dir / "bench_kernels.json").write_text(json.dumps(report, indent=2))
        (out_dir / "bench_kernels.md").write_text(markdown(report))
        return report

    # small sizes first, both geometries each: a run cut short keeps the most results
    problems = [
        (n, name, geometry)
        for n in sorted(set(sizes) | ({args.tune} if args.tune else set()))
        for name, geometry in geometries.items()
    ]
    for n, name, (h, h_kv, d) in problems:
        p = build_problem(h, h_kv, d, n, device, dtype)
        checks, kept, pooled = check_all(p, backend)
        ok = all(r["ok"] for r in checks.values())
        all_ok &= ok
        if args.tune == n:
            for row in tune(p, kept, pooled, backend, timer, quick):
                tuning.append(dict(model=name, n=n, **row))
                print(f"tune {name} N={n} {row}")
        if n not in sizes:
            continue
        times = time_ops(p, kept, pooled, backend, timer)
        sh = shape_of(p, h, kept.shape[1])
        traffic, flops = bytes_model(sh), flops_model(sh)
        attn_ms = prefill_attention_ms(h, h_kv, d, n, device, dtype, timer)
        step_ms = sum(times[op] for op in STEP_OPS)
        print(
            f"\n== {name} N={n} (H={h}, H_kv={h_kv}, D={d}, kept={kept.shape[1]}) "
            f"correct={'yes' if ok else 'NO'}"
        )
        ops = {}
        for op, ms in times.items():
            min_bytes, kernel_bytes = traffic[op]
            gbps = kernel_bytes / (ms * 1e-3) / 1e9
            tflops = flops[op] / (ms * 1e-3) / 1e12 if op in flops else None
            roof = roofline_ms(min_bytes, flops.get(op, 0), copy_gbps, peak_tflops)
            ops[op] = dict(
                ms=ms,
                min_bytes=min_bytes,
                kernel_bytes=kernel_bytes,
                gbps=gbps,
                frac_copy=gbps / copy_gbps,
                tflops=tflops,
                roofline_ms=roof,
                x_roofline=ms / roof,
                **{k: v for k, v in checks.get(op, {}).items()},
            )
            status = checks.get(op, {}).get("ok", True)
            print(
                f"{op:15s} {ms:9.3f} ms {gbps:9.1f} GB/s  {gbps / copy_gbps:6.1%} of copy"
                f"  {ms / roof:5.1f}x roofline"
                f"{'' if tflops is None else f'  {tflops:7.1f} TFLOP/s'}"
                f"{'' if status else '  MISMATCH ' + str(checks[op])}"
            )
        attn_tflops = attention_flops(n, h, d) / (attn_ms * 1e-3) / 1e12
        print(
            f"{'prefill attn':15s} {attn_ms:9.3f} ms (one layer, causal SDPA, "
            f"{attn_tflops:.1f} TFLOP/s)"
        )
        print(
            f"{'compress step':15s} {step_ms:9.3f} ms = {step_ms / attn_ms:6.1%} "
            f"of prefill attention"
        )
        results.append(
            dict(
                model=name,
                n=n,
                heads=h,
                kv_heads=h_kv,
                head_size=d,
                kept=int(kept.shape[1]),
                correct=ok,
                ops=ops,
                prefill_attention_ms=attn_ms,
                prefill_attention_tflops=attn_tflops,
                compress_step_ms=step_ms,
                step_over_attention=step_ms / attn_ms,
            )
        )
        save()
        del p, kept, pooled
        if device.type == "cuda":
            torch.cuda.empty_cache()

    report = save()
    print(
        f"\nwrote {out_dir / 'bench_kernels.json'} and .md in {report['wall_s']:.1f} s; "
        f"all correct: {all_ok}"
    )
    return 0 if all_ok else 1


def markdown(report) -> str:
    env = report["env"]
    lines = [
        f"# Kernel benchmark ({env['device']}, torch {env['torch']}, triton {env['triton']})",
        "",
        f"Copy bandwidth (clone): **{report['copy_gbps']:.0f} GB/s**; bf16 GEMM "
        f"**{report['gemm_tflops']:.0f} TFLOP/s** (same run). bf16, block size "
        f"{env['block_size']}, window {env['window']}, rho {env['rho']}. GB/s counts the "
        "bytes the kernels move; the roofline is the bytes any implementation must move at "
        "copy bandwidth (or the FLOPs at the GEMM rate, whichever is longer).",
        "",
        "| model | N | op | ms | GB/s | % of copy | x roofline | TFLOP/s | correct |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in report["results"]:
        for op, o in r["ops"].items():
            lines.append(
                f"| {r['model']} | {r['n']} | {op} | {o['ms']:.3f} | {o['gbps']:.0f} | "
                f"{o['frac_copy']:.0%} | {o['x_roofline']:.1f} | "
                f"{'' if o['tflops'] is None else format(o['tflops'], '.1f')} | "
                f"{'yes' if o.get('ok', True) else 'NO'} |"
            )
    lines += [
        "",
        "| model | N | prefill attention (ms) | compression step (ms) | step / attention |",
        "|---|---|---|---|---|",
    ]
    for r in report["results"]:
        lines.append(
            f"| {r['model']} | {r['n']} | {r['prefill_attention_ms']:.3f} | "
            f"{r['compress_step_ms']:.3f} | {r['step_over_attention']:.1%} |"
        )
    if report.get("tuning"):
        lines += ["", "| model | N | variable | tiles | op times (ms) |", "|---|---|---|---|---|"]
        for t in report["tuning"]:
            timing = t.get("error") or ", ".join(
                f"{k} {v:.3f}" for k, v in t.items() if k not in ("model", "n", "var", "tiles")
            )
            lines.append(f"| {t['model']} | {t['n']} | {t['var']} | {t['tiles']} | {timing} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
