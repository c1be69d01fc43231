"""Compile every kernel launch for a GPU target on a machine without a GPU.

The Triton interpreter (what the CPU tests run) executes a kernel's Python body with
numpy; it never lowers it, so it cannot see what only the compiler sees: type errors in
the lowering, layouts that do not fit, register spills, shared memory over the SM's
limit. Triton can compile for a CUDA target without a driver (``ptxas`` ships with it),
so this module

1. runs every public op at real model geometries inside ``recording_launches``
   (:mod:`meda_vllm.testing.launches`), which makes the launchers take their GPU branch
   (tile sizes, split counts, tensor-core operand types) and record each launch instead of
   running it;
2. specialises each launch exactly as Triton's JIT would (the same binder and
   ``_pack_args``: argument types, 16-byte alignment and divisibility attributes,
   constexprs, ``num_warps``) and compiles it for ``sm_<arch>`` down to a cubin;
3. runs ``ptxas -v`` on the PTX to read registers, spills and the kernel's shared memory,
   and checks that the ``tl.dot`` kernels (:data:`TILE_KERNELS`) copy their K tiles into
   shared memory with 16-byte ``cp.async``: the compiler does so only when it knows the
   rows' alignment (``HEAD_ALIGN``); without it the tiles are loaded element by element
   (``ld.global.b16``), unpipelined, which costs bandwidth even without spills.

Usage (no GPU, Triton's own interpreter must be off)::

    python -m meda_vllm.testing.compile_check                # sm_90a and sm_80
    python -m meda_vllm.testing.compile_check --arch 90 --json out.json

Exit status 1 when a launch fails to compile, spills registers, needs more shared memory
than the architecture has, or loads its tiles element by element. The matrix is
:data:`CASES`.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass

import torch
import triton

from meda_vllm.kernels import (
    compact_,
    gather_kv,
    paged_cross_modal_entropy,
    paged_merge,
    paged_scores_and_entropy,
    paged_window_scores,
)
from meda_vllm.testing.launches import recording_launches
from meda_vllm.testing.synthetic import paged_request

# Shared memory per block an architecture grants (bytes, opt-in maximum).
SHARED_LIMIT = {80: 166912, 86: 101376, 89: 101376, 90: 232448}
ARCH_NAME = {80: "A100", 86: "RTX 30xx / A10", 89: "L4 / RTX 40xx", 90: "H100 / H200"}
SMS = {80: 108, 86: 84, 89: 58, 90: 132}


@dataclass(frozen=True)
class Case:
    """One geometry the ops are recorded at: ``(H, H_kv, D)``, dtype, block size."""

    name: str
    heads: int
    kv_heads: int
    head_size: int
    dtype: torch.dtype
    block_size: int = 16
    n: int = 4096


def _cases() -> list[Case]:
    cases = []
    for dtype in (torch.bfloat16, torch.float16, torch.float32):
        cases.append(Case("llava-1.5-7b", 32, 32, 128, dtype))
        cases.append(Case("qwen2-vl-7b", 28, 4, 128, dtype))
    cases.append(Case("qwen2-vl-2b", 12, 2, 128, torch.bfloat16, block_size=128))
    cases.append(Case("head64-gqa8", 32, 4, 64, torch.bfloat16))
    cases.append(Case("head80-mha", 32, 32, 80, torch.float16))
    return cases


CASES = _cases()


@dataclass
class Result:
    kernel: str
    case: str
    arch: int
    constexprs: str
    num_warps: int
    ok: bool
    registers: int | None = None
    spill_bytes: int | None = None
    shared_bytes: int | None = None
    wide_copies: int | None = None
    error: str | None = None
    compile_s: float = 0.0


# ---------------------------------------------------------------------- recording
def _problem(case: Case):
    n = case.n
    req = paged_request(n, 1, case.kv_heads, case.head_size, case.block_size, dtype=case.dtype)
    cache, layout, row, vis = req.caches[0], req.layouts[0], req.row, req.vis
    gen = torch.Generator().manual_seed(0)
    window = 32
    q = torch.randn(case.heads, window, case.head_size, generator=gen).to(case.dtype)
    q_pos = torch.arange(n - window, n)
    visual = vis.nonzero()[:, 0]  # MEDA's default sample: at most 128 visual rows
    ent_pos = torch.unique(torch.cat([visual[:: -(-visual.numel() // 128)], q_pos]))
    q_ent = torch.randn(case.heads, ent_pos.numel(), case.head_size, generator=gen)
    budget = max(window, math.ceil(0.2 * n))
    scores = torch.rand(case.kv_heads, n, generator=gen)
    kept = torch.topk(scores, budget, dim=1).indices.sort(dim=1).values
    return dict(
        cache=cache,
        layout=layout,
        row=row,
        n=n,
        q=q,
        q_pos=q_pos,
        q_ent=q_ent.to(case.dtype),
        ent_pos=ent_pos,
        vis=vis,
        kept=kept,
        scores=scores,
    )


def record(case: Case, num_sms: int):
    """Every distinct launch the ops make for ``case`` on a GPU with ``num_sms`` SMs."""
    p = _problem(case)
    c, lay, row, n, kept = p["cache"], p["layout"], p["row"], p["n"], p["kept"]
    new = (torch.zeros(case.kv_heads, kept.shape[1], case.head_size, dtype=case.dtype),) * 2
    # Outputs of recorded launches are never written: the merge launcher sorts the match
    # kernel's output on the host, so every allocation must hold valid (zero) indices.
    empty, empty_like = torch.empty, torch.empty_like
    torch.empty = lambda *a, **k: torch.zeros(*a, **k)
    torch.empty_like = lambda *a, **k: torch.zeros_like(*a, **k)
    try:
        with recording_launches(num_sms) as launches:
            t = "triton"
            gather_kv(c, lay, row, n, backend=t)
            paged_window_scores(p["q"], p["q_pos"], c, lay, row, n, backend=t)
            both_q = torch.cat([p["q"], p["q_ent"]], dim=1)
            both_pos = torch.cat([p["q_pos"], p["ent_pos"]])
            for causal in (False, True):
                paged_cross_modal_entropy(
                    p["q_ent"], p["ent_pos"], c, lay, row, n, p["vis"], causal=causal, backend=t
                )
                paged_scores_and_entropy(
                    both_q, both_pos, p["q"].shape[1], c, lay, row, n, p["vis"],
                    causal=causal, backend=t,
                )  # fmt: skip
            paged_merge(c, lay, row, n, kept, "average", backend=t)
            paged_merge(c, lay, row, n, kept, "weighted", p["scores"], backend=t)
            compact_(c, lay, row, kept, backend=t)
            compact_(c, lay, row, kept, *new, backend=t)
    finally:
        torch.empty, torch.empty_like = empty, empty_like
    return launches


# ---------------------------------------------------------------------- compiling
_ASYNC_COPY = re.compile(
    r"cp\.async\.c[ag]\.shared\.global(?:\.[\w:]+)*\s*\[[^\]]*\],\s*\[[^\]]*\],\s*(0x[0-9a-fA-F]+|\d+)"
)


# the kernels that stream K tiles into tl.dot: their tiles must arrive by 16-byte cp.async
TILE_KERNELS = frozenset({"_split_stats_kernel", "_scores_kernel", "_match_kernel"})


def wide_async_copies(ptx: str) -> int:
    """How many ``cp.async`` global->shared copies in ``ptx`` move 16 bytes."""
    return sum(int(size, 0) >= 16 for size in _ASYNC_COPY.findall(ptx))


def parse_ptxas(text: str) -> tuple[int, int, int]:
    """(registers, spill bytes, static shared bytes) from ``ptxas -v`` output."""
    regs = re.search(r"Used (\d+) registers", text)
    if regs is None:
        raise ValueError(f"no register count in ptxas output: {text.strip()[-300:]!r}")
    spills = re.findall(r"(\d+) bytes spill (?:stores|loads)", text)
    smem = re.search(r"(\d+) bytes smem", text)
    return int(regs.group(1)), sum(int(x) for x in spills), int(smem.group(1)) if smem else 0


def _ptxas_info(ptx: str, arch: int) -> tuple[int, int, int]:
    """Run the ptxas Triton ships with (``-v``) on ``ptx``; see :func:`parse_ptxas`."""
    from triton.backends.nvidia.compiler import get_ptxas

    sm = f"sm_{arch}a" if arch >= 90 else f"sm_{arch}"
    with tempfile.TemporaryDirectory() as tmp:
        src = os.path.join(tmp, "k.ptx")
        with open(src, "w") as f:
            f.write(ptx)
        proc = subprocess.run(
            [get_ptxas(arch).path, f"-arch={sm}", "-v", src, "-o", os.path.join(tmp, "k.cubin")],
            capture_output=True,
            text=True,
        )
    text = proc.stdout + proc.stderr
    if proc.returncode != 0:
        raise RuntimeError(f"ptxas failed: {text.strip()[-500:]}")
    return parse_ptxas(text)


def _compile(launch, arch: int):
    """Compile one recorded launch the way ``JITFunction.run`` would; returns the kernel."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource, make_backend
    from triton.runtime.jit import create_function_from_signature

    kernel = launch.kernel
    target = GPUTarget("cuda", arch, 32)
    backend = make_backend(target)
    binder = create_function_from_signature(kernel.signature, kernel.params, backend)
    kwargs = dict(launch.kwargs)
    bound_args, specialization, options = binder(*launch.args, **kwargs)
    options, signature, constexprs, attrs = kernel._pack_args(
        backend, kwargs, bound_args, specialization, options
    )
    src = ASTSource(kernel, signature, constexprs, attrs)
    return triton.compile(src, target=target, options=options.__dict__), constexprs


def _key(launch) -> tuple:
    """Distinct compilations: kernel, argument types/specialisations, constexprs, options."""
    args = []
    for a in launch.args:
        if isinstance(a, torch.Tensor):
            args.append(("t", a.dtype, a.data_ptr() % 16 == 0))
        elif isinstance(a, bool):
            args.append(("b", a))
        elif isinstance(a, int):
            args.append(("i", a == 1, a % 16 == 0, -(2**31) <= a < 2**31))
        else:
            args.append((type(a).__name__,))
    return (launch.kernel.fn.__name__, tuple(args), tuple(sorted(launch.kwargs.items())))


def compile_launch(launch, arch: int, case: str = "") -> Result:
    """Compile one recorded launch for ``sm_<arch>``; the result says what went wrong."""
    consts = {k: v for k, v in launch.kwargs.items() if k[0].isupper()}
    res = Result(
        kernel=launch.kernel.fn.__name__,
        case=case,
        arch=arch,
        constexprs=" ".join(f"{k}={v}" for k, v in consts.items()),
        num_warps=int(launch.kwargs.get("num_warps", 4)),
        ok=False,
    )
    start = time.perf_counter()
    try:
        compiled, _ = _compile(launch, arch)
        ptx = compiled.asm["ptx"]
        regs, spills, smem = _ptxas_info(ptx, arch)
        res.registers, res.spill_bytes = regs, spills
        res.wide_copies = wide_async_copies(ptx)
        res.shared_bytes = max(smem, int(compiled.metadata.shared))
        limit = SHARED_LIMIT.get(arch, 101376)
        problems = []
        if spills:
            problems.append(f"spills {spills} bytes")
        if res.kernel in TILE_KERNELS and not res.wide_copies:
            problems.append("no 16-byte cp.async: tiles loaded element by element")
        if res.shared_bytes > limit:
            problems.append(f"shared {res.shared_bytes} > {limit} bytes")
        res.ok = not problems
        res.error = "; ".join(problems) or None
    except Exception as exc:  # noqa: BLE001 (reported, the run goes on)
        res.error = f"{type(exc).__name__}: {str(exc).strip()[-800:]}"
    res.compile_s = time.perf_counter() - start
    return res


def check(archs, cases=CASES, progress=print) -> list[Result]:
    """Compile every distinct launch of every case for every arch."""
    if os.environ.get("TRITON_INTERPRET", "0") == "1":
        raise RuntimeError("compile_check needs TRITON_INTERPRET unset (it compiles for a GPU)")
    results = []
    for arch in archs:
        seen = set()
        for case in cases:
            label = f"{case.name}/{str(case.dtype).split('.')[-1]}/bs{case.block_size}"
            for launch in record(case, SMS.get(arch, 132)):
                key = _key(launch)
                if key in seen:
                    continue
                seen.add(key)
                res = compile_launch(launch, arch, label)
                results.append(res)
                progress(_line(res))
    return results


def _line(r: Result) -> str:
    status = "ok " if r.ok else "BAD"
    facts = (
        f"regs {r.registers:3d} spill {r.spill_bytes} smem {r.shared_bytes:6d}"
        if r.registers is not None
        else ""
    )
    tail = f"  {r.error}" if r.error else ""
    return (
        f"{status} sm_{r.arch} {r.kernel:24s} {r.case:28s} warps {r.num_warps} "
        f"{facts} ({r.compile_s:.1f}s){tail}"
    )


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--arch", type=int, action="append", help="compute capability x10 (90, 80)")
    ap.add_argument("--json", type=str, default=None, help="write the results here")
    ap.add_argument("--only", type=str, default="", help="cases whose name/dtype contains this")
    args = ap.parse_args(argv)
    archs = args.arch or [90, 80]
    cases = [c for c in CASES if args.only in f"{c.name}/{c.dtype}/bs{c.block_size}"]
    started = time.perf_counter()
    print(f"triton {triton.__version__}, torch {torch.__version__}; compiling for {archs}")
    results = check(archs, cases)
    bad = [r for r in results if not r.ok]
    print(
        f"\n{len(results)} compilations in {time.perf_counter() - started:.0f} s: "
        f"{len(results) - len(bad)} ok, {len(bad)} failed"
    )
    if args.json:
        with open(args.json, "w") as f:
            json.dump([asdict(r) for r in results], f, indent=1)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
