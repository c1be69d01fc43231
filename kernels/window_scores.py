"""Observation-window attention scores straight from the paged cache (SnapKV building block).

``score[h_kv, i] = 1/g * sum_{query heads of group h_kv} sum_r softmax_i(q_r . k_i * scale)``
with the causal mask ``i <= q_pos[r]`` and fp32 softmax. Two passes over K, never more
than one ``[BLOCK_R, BLOCK_N]`` tile of probabilities alive:

1. split-K row statistics (``split_stats.py``, shared with MEDA's entropy, which can ride
   along in the same launch): each program scans a chunk of keys for one block of the
   ``g*R`` rows of one KV head with an online softmax (running max ``m``, sum ``l``, base
   2); the row blocks of a chunk are neighbours in the grid, so they share its K in L2;
2. a tiny combine kernel folds the chunks into ``lse = m + log2(l)`` per row;
3. one program per (key tile, KV head) recomputes ``q . k`` and sums
   ``exp2(s - lse)`` over rows: every key tile is owned by one program, so no atomics.

Traffic: K is read twice (``2*n*H_kv*D`` elements), Q ``(n/BLOCK_N + splits)`` times
(small, stays in L2), output ``n*H_kv`` fp32. V is never read.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import triton
import triton.language as tl

from meda_vllm.selection import attention_column_sums

from . import dispatch
from .dispatch import dot_in_fp32, dot_tiles, resolve_backend
from .gather import gather_pages_reference, per_layer
from .layout import LayerSet, PagedKVLayout, check_caches, check_queries, check_row
from .split_stats import LOG2E, SplitStats, split_stats
from .tiles import load_k_tile, load_query_rows


@triton.jit
def _lse_kernel(m_ptr, l_ptr, lse_ptr, group_rows, stats_rows, num_splits, BLOCK_R: tl.constexpr):
    # the window rows are the first group_rows of every stats_rows-long partial row
    kv_head = tl.program_id(0)
    rr = tl.program_id(1) * BLOCK_R + tl.arange(0, BLOCK_R)
    mask_r = rr < group_rows
    m_i = tl.full([BLOCK_R], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_R], tl.float32)
    for split in range(0, num_splits):
        at = (kv_head * num_splits + split).to(tl.int64) * stats_rows + rr
        m_s = tl.load(m_ptr + at, mask=mask_r, other=float("-inf"))
        l_s = tl.load(l_ptr + at, mask=mask_r, other=0.0)
        m_new = tl.maximum(m_i, m_s)
        m_use = tl.where(m_new == float("-inf"), 0.0, m_new)
        l_i = l_i * tl.exp2(m_i - m_use) + l_s * tl.exp2(m_s - m_use)
        m_i = m_new
    # Rows with no visible key get lse = +inf, so their probabilities are exactly 0.
    lse = tl.where(l_i > 0, m_i + tl.log2(tl.maximum(l_i, 1e-30)), float("inf"))
    tl.store(lse_ptr + kv_head.to(tl.int64) * group_rows + rr, lse, mask=mask_r)


@triton.jit
def _scores_kernel(
    q_ptr,
    q_pos_ptr,
    cache_ptr,
    row_ptr,
    lse_ptr,
    out_ptr,
    n,
    rows_per_head,
    group_rows,
    q_stride_h,
    q_stride_r,
    q_stride_d,
    block_stride,
    head_off_ptr,
    k_offset,
    k_token_stride,
    k_dim_stride,
    qk_scale,
    inv_group,
    GROUP: tl.constexpr,
    BLOCK_SIZE: tl.constexpr,
    HEAD_ALIGN: tl.constexpr,
    HEAD_SIZE: tl.constexpr,
    DOT_FP32: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    kv_head = tl.program_id(1)
    keys = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_n = keys < n
    offs_d = tl.arange(0, BLOCK_D)
    mask_d = offs_d < HEAD_SIZE
    k = load_k_tile(
        cache_ptr, row_ptr, keys, mask_n, kv_head.to(tl.int64), offs_d, mask_d,
        block_stride, head_off_ptr, k_offset, k_token_stride, k_dim_stride,
        BLOCK_SIZE, HEAD_ALIGN,
    )  # fmt: skip
    if DOT_FP32:  # noqa: SIM108 (explicit constexpr branches in kernels)
        k_t = tl.trans(k.to(tl.float32))
    else:
        k_t = tl.trans(k)

    acc = tl.zeros([BLOCK_N], tl.float32)
    for row_lo in range(0, group_rows, BLOCK_R):
        rr = row_lo + tl.arange(0, BLOCK_R)
        mask_r = rr < group_rows
        q, r = load_query_rows(
            q_ptr, kv_head, rr, mask_r, offs_d, mask_d, rows_per_head, 0,
            q_stride_h, q_stride_r, q_stride_d, GROUP, DOT_FP32,
        )  # fmt: skip
        q_pos = tl.load(q_pos_ptr + r, mask=mask_r, other=-1).to(tl.int64)
        lse = tl.load(
            lse_ptr + kv_head.to(tl.int64) * group_rows + rr, mask=mask_r, other=float("inf")
        )
        if DOT_FP32:  # noqa: SIM108
            s = tl.dot(q, k_t, input_precision="ieee")
        else:
            s = tl.dot(q, k_t)
        visible = (keys[None, :] <= q_pos[:, None]) & mask_n[None, :]
        # Hidden keys become -inf before exp2: -inf - lse is -inf (even for lse = +inf).
        s = tl.where(visible, s * qk_scale, float("-inf"))
        p = tl.exp2(s - lse[:, None])
        acc += tl.sum(p, 0)

    tl.store(out_ptr + kv_head.to(tl.int64) * n + keys, acc * inv_group, mask=mask_n)


def _launch(q, q_pos, caches: LayerSet, row, n: int, scale: float, group: int):
    if n == 0 or q.shape[1] == 0:
        return torch.zeros((caches.num_heads, n), dtype=torch.float32, device=caches.device)
    stats = split_stats(q, q_pos, caches, row, n, scale, group, window_rows=q.shape[1])
    return finish_scores(q, q_pos, caches, row, n, scale, stats)


def finish_scores(q, q_pos, caches: LayerSet, row, n: int, scale: float, stats: SplitStats):
    """Passes 2-3 over ``q``/``q_pos`` (the window rows, first in ``stats``): fold the
    chunks into ``lse``, then sum the probabilities per key: ``[H_kv, n]``."""
    cache, layout = caches.base, caches.layout
    h_kv, d = caches.num_heads, layout.head_size
    device = cache.device
    out = torch.zeros((h_kv, n), dtype=torch.float32, device=device)
    rows, group = q.shape[1], stats.group
    group_rows = group * rows
    lse = torch.empty((h_kv, group_rows), dtype=torch.float32, device=device)
    block_c = min(1024, triton.next_power_of_2(group_rows))
    dispatch.launchable(_lse_kernel, device)[(h_kv, triton.cdiv(group_rows, block_c))](
        stats.m, stats.z, lse, group_rows, stats.stats_rows, stats.splits, BLOCK_R=block_c
    )
    dot_fp32 = dot_in_fp32(q.dtype, cache.dtype, device)
    block_r, block_n, warps = dot_tiles(group_rows, dot_fp32, device)
    # The score pass reloads every query row (from L2) for each key tile it owns: wider
    # key tiles amortise that (Qwen2-VL: 7 x 32 rows = 57 KB of Q per tile, vs 8 KB of K
    # in a 32-key tile); the statistics pass streams many key tiles per load instead.
    # 64 keys: 2x less Q traffic than 32 and no register spills; 128 needs ~220 registers.
    block_n_scores = block_n if dot_fp32 else max(block_n, 64)
    dispatch.launchable(_scores_kernel, device)[(triton.cdiv(n, block_n_scores), h_kv)](
        q,
        q_pos,
        cache,
        row,
        lse,
        out,
        n,
        rows,
        group_rows,
        *q.stride(),
        *layout.k_args(caches.head_offsets),
        scale * LOG2E,
        1.0 / group,
        GROUP=group,
        BLOCK_SIZE=layout.block_size,
        HEAD_ALIGN=caches.head_align,
        HEAD_SIZE=d,
        DOT_FP32=dot_fp32,
        BLOCK_R=block_r,
        BLOCK_N=block_n_scores,
        BLOCK_D=max(16, triton.next_power_of_2(d)),
        num_warps=warps,
    )
    return out


# ---------------------------------------------------------------------- public op
def paged_window_scores(
    q: torch.Tensor,
    q_pos: torch.Tensor,
    cache: torch.Tensor | Sequence[torch.Tensor],
    layout: PagedKVLayout,
    row: torch.Tensor,
    n: int,
    scale: float | None = None,
    *,
    backend: str | None = None,
) -> torch.Tensor:
    """Causal window-attention column sums per KV head: fp32 ``[H_kv, n]``.

    ``q [H, R, D]`` are the window's query rows (post-RoPE), ``q_pos [R]`` their prompt
    positions (ascending, in ``[0, n)``); ``scale`` defaults to ``1/sqrt(D)``. A sequence of
    ``L`` layer caches scores all layers in one pass: ``q [L * H, R, D]`` (layer-major),
    output ``[L * H_kv, n]`` (see ``LayerSet``).
    """
    caches = check_caches(cache, layout)
    check_row(row, caches.base, layout, n)
    group = check_queries(q, q_pos, caches, n)
    scale = 1.0 / math.sqrt(layout.head_size) if scale is None else float(scale)
    if resolve_backend(backend, caches.device) == "torch":  # the core's own column sums
        return per_layer(
            caches,
            lambda c, ql: attention_column_sums(
                ql, q_pos.long(), gather_pages_reference(layout.k_view(c), layout, row, n), scale
            ),
            list(q.chunk(caches.num_layers, dim=0)),
        )
    return _launch(q, q_pos, caches, row, n, scale, group)
