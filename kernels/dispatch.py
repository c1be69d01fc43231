"""Choose between the Triton kernels and the plain-torch references.

``backend`` argument of every public op (or, when it is ``None``, the environment variable
``MEDA_KERNELS``):

* ``"auto"`` (default): Triton for CUDA tensors, the torch reference otherwise;
* ``"triton"``: always Triton; on CPU tensors the kernels run in Triton's interpreter
  (slow; meant for tests: set ``TRITON_INTERPRET=1`` before triton is first imported);
* ``"torch"``: always the torch reference.
"""

from __future__ import annotations

import os

import torch
import triton

BACKENDS = ("auto", "triton", "torch")
ENV_VAR = "MEDA_KERNELS"


def resolve_backend(backend: str | None, device: torch.device) -> str:
    """Return ``"triton"`` or ``"torch"`` for a call on ``device``."""
    choice = backend if backend is not None else os.environ.get(ENV_VAR, "auto").strip().lower()
    if choice not in BACKENDS:
        source = "backend" if backend is not None else f"${ENV_VAR}"
        raise ValueError(f"{source} must be one of {BACKENDS}, got {choice!r}")
    if choice == "auto":
        return "triton" if device.type == "cuda" else "torch"
    return choice


def launchable(kernel, device: torch.device):
    """The kernel object to launch for tensors on ``device``.

    A kernel decorated while ``TRITON_INTERPRET`` was unset is a compiled ``JITFunction``
    and cannot touch CPU tensors; nor can an interpreted kernel call ``tl.sum``/``tl.max``
    if triton itself was imported before the variable was set.
    """
    if device.type == "cpu" and not interpreter_ready(kernel):
        raise RuntimeError(
            "backend='triton' on CPU tensors runs in Triton's interpreter: set "
            "TRITON_INTERPRET=1 before triton is first imported (or use backend='torch')"
        )
    return kernel


def interpreter_ready(kernel=None) -> bool:
    """Whether ``kernel`` and triton's own library (``tl.sum``...) run in the interpreter."""
    import triton.language as tl

    def interpreted(fn):
        return type(fn).__name__ == "InterpretedFunction"

    if kernel is None:
        kernel = _interpreter_probe
    return interpreted(kernel) and interpreted(tl.sum)


@triton.jit
def _interpreter_probe(x):
    """Never launched: shows whether ``@triton.jit`` made an interpreted function here."""
    pass


def is_interpreted(device: torch.device) -> bool:
    """True when kernels for ``device`` run in the (slow) Triton interpreter."""
    return device.type == "cpu" or os.environ.get("TRITON_INTERPRET", "0") == "1"


def num_sms(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 1


def plan_splits(n: int, block_n: int, parallel: int, device: torch.device) -> tuple[int, int]:
    """Split ``n`` keys into chunks for split-K kernels; return ``(keys_per_split, splits)``.

    ``parallel`` is the number of programs the grid already has per split (e.g. KV heads).
    On GPU aim for about two programs per SM; in the interpreter use at most two splits
    (enough to exercise the combine step, few enough to stay fast).
    """
    tiles = max(1, triton.cdiv(n, block_n))
    if is_interpreted(device):
        splits = min(2, tiles)
    else:
        splits = min(tiles, max(1, triton.cdiv(2 * num_sms(device), max(1, parallel))))
    keys_per_split = triton.cdiv(tiles, splits) * block_n
    return keys_per_split, max(1, triton.cdiv(n, keys_per_split))


def env_tiles(var: str) -> tuple[int, int, int] | None:
    """``(a, b, num_warps)`` from ``$var="a,b,w"`` (tuning runs only), else None."""
    text = os.environ.get(var, "").strip()
    if not text:
        return None
    try:
        a, b, w = (int(x) for x in text.split(","))
    except ValueError:
        raise ValueError(f"${var} must be three ints 'a,b,warps', got {text!r}") from None
    for x in (a, b):
        if x < 16 or x & (x - 1):
            raise ValueError(f"${var}: tile sizes must be powers of two >= 16, got {text!r}")
    if w not in (1, 2, 4, 8, 16):
        raise ValueError(f"${var}: warps must be 1, 2, 4, 8 or 16, got {text!r}")
    return a, b, w


def dot_tiles(rows: int, dot_fp32: bool, device: torch.device) -> tuple[int, int, int]:
    """``(BLOCK_R, BLOCK_N, num_warps)`` of the kernels that ``tl.dot`` query rows with keys.

    GPU, fp16/bf16 operands: up to 128 rows (all of a Qwen2-VL KV head's 7 x 32 window
    rows in two tiles: two programs that share each key tile through L2) by 32 keys,
    8 warps (4 under 64 rows). fp32 operands (``input_precision="ieee"``: an FMA loop, not
    tensor cores): ``[16, 64]`` with 8 warps. These are the tiles that ``compile_check``
    compiles without register spills for sm_90a and sm_80 with both Triton 3.9 (here) and
    3.6 (the GPU machines' version); e.g. ``[64, 64]`` x 4 warps spilled 16-32 KB in fp32
    and ``[64, 64]`` x 8 warps spilled the bf16 entropy kernel on sm_80 with Triton 3.6.
    Interpreter: big tiles (fewer Python-level iterations). ``$MEDA_DOT_TILES="R,N,W"``
    overrides the GPU choice (tuning runs, ``benchmarks/kernels/bench_kernels.py --tune``).
    """
    if is_interpreted(device):
        return min(256, max(16, triton.next_power_of_2(rows))), 128, 4
    override = env_tiles("MEDA_DOT_TILES")
    if override:
        return override
    if dot_fp32:
        return 16, 64, 8
    block_r = min(128, max(16, triton.next_power_of_2(rows)))
    return block_r, 32, 8 if block_r >= 64 else 4


def match_tiles(dot_fp32: bool, device: torch.device) -> tuple[int, int, int]:
    """``(BLOCK_E, BLOCK_S, num_warps)`` of the merge's match kernel (evicted x kept keys).

    GPU, 16-bit: every program streams all kept keys of its head from L2, so 128 evicted
    rows per program halve that traffic against 64 (~64 FLOP per L2 byte, about what the
    tensor cores need). fp32 (FMA dot): ``[32, 64]``, as ``[64, 64]`` spills at head size
    128. All spill-free with Triton 3.6/3.9 on sm_90a and sm_80 (``compile_check``).
    ``$MEDA_MATCH_TILES="E,S,W"`` overrides the GPU choice (tuning runs).
    """
    if is_interpreted(device):
        return 128, 128, 4
    override = env_tiles("MEDA_MATCH_TILES")
    if override:
        return override
    return (32, 64, 8) if dot_fp32 else (128, 64, 8)


def copy_tile_tokens(cache: torch.Tensor) -> int:
    """Tokens per program of the kernels that copy whole K/V rows (gather, compaction):
    64 tokens x 128 dims of K and V in 16-bit, 32 in fp32 (~100 registers either way;
    64 fp32 tokens took ~200)."""
    return 256 if is_interpreted(cache.device) else 128 // cache.element_size()


def dot_in_fp32(a: torch.dtype, b: torch.dtype, device: torch.device) -> bool:
    """Whether a kernel's ``tl.dot`` must take fp32 operands (``input_precision="ieee"``).

    fp32 inputs: TF32 would lose ~3 decimal digits against the fp32 references. Mixed
    dtypes: ``tl.dot`` needs equal operand types. bf16 in the interpreter: Triton 3.x's
    interpreter stores bf16 as uint16 and its ``dot`` multiplies those integers, so
    operands are widened first (exact: bf16 products are exact in fp32, the same sums the
    GPU tensor cores accumulate in fp32).
    """
    if a != b or a == torch.float32:
        return True
    return a == torch.bfloat16 and is_interpreted(device)
