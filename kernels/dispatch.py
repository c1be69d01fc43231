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
        from .gather import _gather_kernel as kernel
    return interpreted(kernel) and interpreted(tl.sum)


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
