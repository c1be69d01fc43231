"""1-D pooling of per-position scores (SnapKV smooths window scores with kernel 7).

Stride 1, odd ``kernel_size``, "same" padding (``kernel_size // 2`` each side), so the
output has the input's shape. Padding never influences the result: ``max`` ignores it
(``F.max_pool1d`` pads with -inf) and ``avg`` divides by the number of real positions
in the window (``F.avg_pool1d(..., count_include_pad=False)``), so edge tokens are not
penalised against interior ones. Traffic: read ``kernel_size`` overlapping tiles (L1/L2
hits), i.e. one read and one write of ``H_kv*n`` fp32.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from .dispatch import launchable, resolve_backend

POOL_MODES = ("max", "avg")


@triton.jit
def _pool_kernel(
    x_ptr,
    out_ptr,
    n,
    x_stride_h,
    KERNEL: tl.constexpr,
    IS_MAX: tl.constexpr,
    BLOCK: tl.constexpr,
):
    head = tl.program_id(1).to(tl.int64)
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    if IS_MAX:  # noqa: SIM108 (explicit constexpr branches in kernels)
        acc = tl.full([BLOCK], float("-inf"), tl.float32)
    else:
        acc = tl.zeros([BLOCK], tl.float32)
    count = tl.zeros([BLOCK], tl.float32)
    for o in tl.static_range(KERNEL):
        idx = offs + (o - KERNEL // 2)
        valid = (idx >= 0) & (idx < n)
        if IS_MAX:
            x = tl.load(x_ptr + head * x_stride_h + idx, mask=valid, other=float("-inf"))
            acc = tl.maximum(acc, x)
        else:
            x = tl.load(x_ptr + head * x_stride_h + idx, mask=valid, other=0.0)
            acc += x
            count += valid.to(tl.float32)
    if not IS_MAX:
        acc = acc / tl.maximum(count, 1.0)
    tl.store(out_ptr + head * n + offs, acc, mask=mask)


def pool_scores_reference(scores: torch.Tensor, kernel_size: int, mode: str = "max"):
    """Torch reference of :func:`pool_scores` (also the CPU path)."""
    x = scores.float()[:, None, :]
    pad = kernel_size // 2
    if mode == "max":
        return F.max_pool1d(x, kernel_size, stride=1, padding=pad)[:, 0]
    return F.avg_pool1d(x, kernel_size, stride=1, padding=pad, count_include_pad=False)[:, 0]


def pool_scores(
    scores: torch.Tensor,
    kernel_size: int = 7,
    mode: str = "max",
    *,
    backend: str | None = None,
) -> torch.Tensor:
    """Pool ``scores [H_kv, n]`` along positions; returns fp32 ``[H_kv, n]``."""
    if not isinstance(scores, torch.Tensor) or scores.dim() != 2 or not scores.is_floating_point():
        raise ValueError("scores must be a [H_kv, n] float tensor")
    if not isinstance(kernel_size, int) or kernel_size < 1 or kernel_size % 2 == 0:
        raise ValueError(f"kernel_size must be a positive odd int, got {kernel_size!r}")
    if mode not in POOL_MODES:
        raise ValueError(f"mode must be one of {POOL_MODES}, got {mode!r}")
    h_kv, n = scores.shape
    if kernel_size == 1 or n == 0:
        return scores.float().clone()
    if resolve_backend(backend, scores.device) == "torch":
        return pool_scores_reference(scores, kernel_size, mode)
    x = scores.float()
    if x.stride(1) != 1:
        x = x.contiguous()
    out = torch.empty((h_kv, n), dtype=torch.float32, device=scores.device)
    block = 1024
    launchable(_pool_kernel, scores.device)[(triton.cdiv(n, block), h_kv)](
        x, out, n, x.stride(0), KERNEL=kernel_size, IS_MAX=mode == "max", BLOCK=block
    )
    return out
