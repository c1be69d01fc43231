"""Every kernel launch compiles for sm_90a and sm_80 without a GPU, without spills.

The interpreter tests check what the kernels compute; they never lower a kernel. This
runs ``python -m meda_vllm.testing.compile_check`` (Triton's compiler + the ptxas it
ships, no CUDA driver needed) in its own process, because this directory's kernels were
imported in interpreter mode.
"""

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

import meda_vllm.kernels as kernels_pkg
from meda_vllm.kernels import PagedKVLayout, paged_window_scores
from meda_vllm.testing.compile_check import TILE_KERNELS, parse_ptxas
from meda_vllm.testing.launches import recording_launches

NEEDS_INTERPRETER = False  # nothing here runs a kernel in this process
KERNEL_DIR = Path(kernels_pkg.__file__).resolve().parent


def _ptxas_available() -> bool:
    try:
        from triton.backends.nvidia.compiler import get_ptxas

        return os.path.exists(get_ptxas(90).path)
    except Exception:  # noqa: BLE001
        return False


needs_ptxas = pytest.mark.skipif(not _ptxas_available(), reason="triton ships no ptxas here")


def _compiler_env():
    env = dict(os.environ)
    env.pop("TRITON_INTERPRET", None)
    env.pop("MEDA_DOT_TILES", None)
    return env


def _run_json(args: list[str], cwd: Path):
    """Run ``python *args`` with the compiler (no interpreter); its last line as JSON."""
    proc = subprocess.run(
        [sys.executable, *args],
        env=_compiler_env(),
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _all_kernel_names() -> set[str]:
    """Names of every ``@triton.jit`` kernel defined in the package (``_*_kernel``)."""
    names = set()
    for path in KERNEL_DIR.glob("*.py"):
        for line in path.read_text().splitlines():
            if line.startswith("def _") and line.split("(")[0].endswith("_kernel"):
                names.add(line[4:].split("(")[0])
    return names


@needs_ptxas
@pytest.mark.slow
def test_every_kernel_launch_compiles_for_sm90_and_sm80(tmp_path):
    out = tmp_path / "compile.json"
    proc = subprocess.run(
        [sys.executable, "-m", "meda_vllm.testing.compile_check", "--json", str(out)],
        env=_compiler_env(),
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
    results = json.loads(out.read_text())
    assert results and all(r["ok"] for r in results)
    assert {r["arch"] for r in results} == {90, 80}
    # every kernel the package defines is launched by some op in the matrix
    assert {r["kernel"] for r in results} == _all_kernel_names()
    assert all(r["spill_bytes"] == 0 and 0 < r["registers"] <= 255 for r in results)
    # the tl.dot kernels' K tiles arrive by 16-byte async copies (vectorised, pipelined)
    assert all(r["wide_copies"] > 0 for r in results if r["kernel"] in TILE_KERNELS)
    # bf16, fp16 and fp32 caches were all compiled (tensor-core and FMA dot paths)
    assert {"bfloat16", "float16", "float32"} <= {r["case"].split("/")[1] for r in results}


@needs_ptxas
def test_compile_check_reports_a_kernel_that_does_not_compile(tmp_path):
    """The check can fail: a kernel with a non-power-of-two ``tl.arange`` is reported."""
    script = textwrap.dedent(
        """
        import json, sys, torch, triton, triton.language as tl
        from meda_vllm.testing.compile_check import compile_launch
        from meda_vllm.testing.launches import LaunchRecord

        @triton.jit
        def _bad_kernel(x_ptr, N: tl.constexpr):
            offs = tl.arange(0, N)
            tl.store(x_ptr + offs, tl.load(x_ptr + offs) * 2)

        @triton.jit
        def _good_kernel(x_ptr, N: tl.constexpr):
            offs = tl.arange(0, N)
            tl.store(x_ptr + offs, tl.load(x_ptr + offs) * 2)

        x = torch.zeros(16)
        bad = compile_launch(LaunchRecord(_bad_kernel, (1,), (x,), {"N": 12}), 90)
        good = compile_launch(LaunchRecord(_good_kernel, (1,), (x,), {"N": 16}), 90)
        print(json.dumps([bad.ok, bad.error, good.ok, good.registers]))
        """
    )
    path = tmp_path / "bad_kernel.py"  # @triton.jit needs its source in a file
    path.write_text(script)
    bad_ok, bad_error, good_ok, good_regs = _run_json([str(path)], tmp_path)
    assert not bad_ok and "power of 2" in bad_error.lower().replace("two", "2")
    assert good_ok and good_regs > 0


@needs_ptxas
def test_compile_check_reports_tiles_loaded_element_by_element(tmp_path):
    """The check can fail on vectorisation: the statistics kernel recorded at LLaVA's
    bf16 geometry passes with its real ``HEAD_ALIGN`` (16-byte cp.async K tiles) and is
    reported with ``HEAD_ALIGN=1`` (the compiler no longer knows the rows' alignment and
    loads the tiles one bf16 at a time, as it did before the head-offset table had one)."""
    script = textwrap.dedent(
        """
        import json, torch
        from meda_vllm.testing import compile_check as cc
        case = next(c for c in cc.CASES if c.name == "llava-1.5-7b" and c.dtype == torch.bfloat16)
        launch = next(
            l for l in cc.record(case, 132) if l.kernel.fn.__name__ == "_split_stats_kernel"
        )
        good = cc.compile_launch(launch, 90)
        launch.kwargs["HEAD_ALIGN"] = 1
        bad = cc.compile_launch(launch, 90)
        print(json.dumps([good.ok, good.wide_copies, bad.ok, bad.wide_copies, bad.error]))
        """
    )
    good_ok, good_wide, bad_ok, bad_wide, bad_error = _run_json(["-c", script], tmp_path)
    assert good_ok and good_wide > 0
    assert not bad_ok and bad_wide == 0 and "element by element" in bad_error


def test_parse_ptxas_counts_spills_and_shared_memory():
    text = (
        "ptxas info    : Function properties for _k\n"
        "    4912 bytes stack frame, 5544 bytes spill stores, 10044 bytes spill loads\n"
        "ptxas info    : Used 32 registers, used 1 barriers, 1024 bytes smem\n"
    )
    assert parse_ptxas(text) == (32, 5544 + 10044, 1024)
    assert parse_ptxas("ptxas info : Used 80 registers")[1:] == (0, 0)
    with pytest.raises(ValueError, match="no register count"):
        parse_ptxas("ptxas fatal : Unsupported .version 9.4")


def test_recording_takes_the_gpu_branch_and_runs_nothing():
    """Inside ``recording_launches`` the launcher picks GPU tiles for CPU tensors, records
    its three launches (split-K statistics, lse, scores) and writes nothing."""
    n, h_kv, d = 300, 2, 64
    cache = torch.randn(12, h_kv, 32, 2 * d)
    layout = PagedKVLayout.from_logical(cache)
    row = torch.arange(10, dtype=torch.int32)
    q = torch.randn(8, 4, d)
    q_pos = torch.arange(n - 4, n)
    with recording_launches(num_sms=100) as launches:
        out = paged_window_scores(q, q_pos, cache, layout, row, n, backend="triton")
    assert [launch.kernel.fn.__name__ for launch in launches] == [
        "_split_stats_kernel",
        "_lse_kernel",
        "_scores_kernel",
    ]
    stats, _, scores = launches
    assert stats.kwargs["BLOCK_N"] == 64 and stats.kwargs["num_warps"] == 8  # GPU tiles
    assert stats.kwargs["DOT_FP32"] is True  # fp32 cache: ieee FMA dot
    assert scores.grid == (-(-n // 64), h_kv)
    assert torch.count_nonzero(out) == 0  # nothing ran
    with pytest.raises(RuntimeError, match="nest"), recording_launches(), recording_launches():
        pass
