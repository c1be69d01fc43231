"""Split-K softmax statistics of query rows against a paged cache: the first pass of the
window scores and of MEDA's cross-modal entropy, alone or both in one launch.

``q [H, R, D]`` holds up to two sets of rows: the first ``window_rows`` rows see every key
at or before their position (causal: the window scores' rows); the others, when a
modality mask is given, see only the keys of the other modality (text rows visual keys,
visual rows text keys; also causal with ``causal=True``: the entropy's rows). For every
(KV head, key chunk, row) one streaming pass keeps, in base 2,

    m = running max,  Z' = sum e^(s - m),  T' = sum e^(s - m) (s - m)   (T': entropy rows)

so that ``lse = m + log Z'`` (window scores) and ``H = log Z' - T'/Z'`` (entropy) follow
from folding the chunks. One program per (row block, key chunk, KV head); the row blocks
of both sets are the fastest grid axis, so every program that reads a key chunk runs
beside the others and they share it through L2: K comes from DRAM once for both sets
(MEDA's window scores and entropy: one read of K instead of two).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from . import dispatch
from .dispatch import dot_in_fp32, dot_tiles, plan_splits
from .layout import LayerSet
from .tiles import load_k_tile, load_query_rows

LOG2E = 1.4426950408889634


@triton.jit
def _split_stats_kernel(
    q_ptr,
    q_pos_ptr,
    vis_ptr,
    cache_ptr,
    row_ptr,
    m_ptr,
    z_ptr,
    t_ptr,
    n,
    window_rows,
    entropy_rows,
    window_blocks,
    keys_per_split,
    q_stride_h,
    q_stride_r,
    q_stride_d,
    block_stride,
    head_off_ptr,
    k_offset,
    k_token_stride,
    k_dim_stride,
    qk_scale,
    GROUP: tl.constexpr,
    HAS_VIS: tl.constexpr,
    CAUSAL: tl.constexpr,
    BLOCK_SIZE: tl.constexpr,
    HEAD_ALIGN: tl.constexpr,
    HEAD_SIZE: tl.constexpr,
    DOT_FP32: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    block = tl.program_id(0)
    split = tl.program_id(1)
    num_splits = tl.num_programs(1)
    kv_head = tl.program_id(2)
    # which set this row block belongs to: window rows first, then entropy rows
    is_ent = block >= window_blocks
    set_rows = tl.where(is_ent, entropy_rows, window_rows)
    row_base = tl.where(is_ent, window_rows, 0)
    rr = (block - tl.where(is_ent, window_blocks, 0)) * BLOCK_R + tl.arange(0, BLOCK_R)
    mask_r = rr < GROUP * set_rows
    offs_d = tl.arange(0, BLOCK_D)
    mask_d = offs_d < HEAD_SIZE
    key_lo = split * keys_per_split
    key_hi = tl.minimum(key_lo + keys_per_split, n)
    head = kv_head.to(tl.int64)

    q, r = load_query_rows(
        q_ptr, kv_head, rr, mask_r, offs_d, mask_d, set_rows, row_base,
        q_stride_h, q_stride_r, q_stride_d, GROUP, DOT_FP32,
    )  # fmt: skip
    q_pos = tl.load(q_pos_ptr + r, mask=mask_r, other=0).to(tl.int64)
    if HAS_VIS:
        row_vis = tl.load(vis_ptr + q_pos, mask=mask_r, other=0) != 0

    m_i = tl.full([BLOCK_R], float("-inf"), tl.float32)
    z_i = tl.zeros([BLOCK_R], tl.float32)
    t_i = tl.zeros([BLOCK_R], tl.float32)
    for key_start in range(key_lo, key_hi, BLOCK_N):
        keys = key_start + tl.arange(0, BLOCK_N)
        mask_n = keys < key_hi
        k = load_k_tile(
            cache_ptr, row_ptr, keys, mask_n, head, offs_d, mask_d,
            block_stride, head_off_ptr, k_offset, k_token_stride, k_dim_stride,
            BLOCK_SIZE, HEAD_ALIGN,
        )  # fmt: skip
        if DOT_FP32:
            s = tl.dot(q, tl.trans(k.to(tl.float32)), input_precision="ieee")
        else:
            s = tl.dot(q, tl.trans(k))
        s = s * qk_scale
        visible = keys[None, :] <= q_pos[:, None]
        if HAS_VIS:
            key_vis = tl.load(vis_ptr + keys, mask=mask_n, other=0) != 0
            cross = key_vis[None, :] != row_vis[:, None]
            if CAUSAL:
                cross = cross & visible
            visible = tl.where(is_ent, cross, visible)
        visible = visible & mask_n[None, :] & mask_r[:, None]
        m_new = tl.maximum(m_i, tl.max(tl.where(visible, s, float("-inf")), 1))
        m_use = tl.where(m_new == float("-inf"), 0.0, m_new)
        diff = tl.where(visible, s - m_use[:, None], 0.0)
        p = tl.where(visible, tl.exp2(diff), 0.0)
        alpha = tl.exp2(m_i - m_use)
        if HAS_VIS:
            # rescale the old sums to the new max: T' -> a (T' + (m_old - m_new) Z')
            shift = tl.where(z_i > 0, m_i - m_use, 0.0)
            t_i = alpha * (t_i + shift * z_i) + tl.sum(p * diff, 1)
        z_i = alpha * z_i + tl.sum(p, 1)
        m_i = m_new

    stats_rows = GROUP * (window_rows + entropy_rows)
    at = (kv_head * num_splits + split).to(tl.int64) * stats_rows
    out = at + tl.where(is_ent, GROUP * window_rows, 0) + rr
    tl.store(m_ptr + out, m_i, mask=mask_r)
    tl.store(z_ptr + out, z_i, mask=mask_r)
    if HAS_VIS:
        tl.store(t_ptr + out, t_i, mask=mask_r)


def _row_tiles(
    window: int, entropy: int, dot_fp32: bool, device: torch.device
) -> tuple[int, int, int]:
    """:func:`~.dispatch.dot_tiles` for the larger set, or a smaller row tile when that
    pads the two sets' rows far less: the largest tile whose padded row count is within
    10 % of the least (MEDA on LLaVA: 32 + 160 rows take 32-row tiles, 192 rows computed
    rather than 384 with 128-row tiles; Qwen2-VL's 224 + 1120 keep 128)."""
    tiles = dot_tiles(max(window, entropy), dot_fp32, device)
    if not (window and entropy) or tiles[0] <= 16:
        return tiles

    def padded(rows: int) -> int:
        return triton.cdiv(window, rows) * rows + triton.cdiv(entropy, rows) * rows

    sizes = [r for r in (16, 32, 64, 128, 256) if r <= tiles[0]]
    least = min(padded(r) for r in sizes)
    best = max(r for r in sizes if padded(r) <= 1.1 * least)
    return tiles if best == tiles[0] else dot_tiles(best, dot_fp32, device)


@dataclass(frozen=True)
class SplitStats:
    """Partials ``[H_kv, splits, group * R]`` (fp32): per KV head and key chunk, the GQA
    group's window rows (``group * window_rows`` of them) then its entropy rows. ``t`` is
    None without entropy rows."""

    m: torch.Tensor
    z: torch.Tensor
    t: torch.Tensor | None
    splits: int
    group: int
    window_rows: int

    @property
    def stats_rows(self) -> int:
        return self.m.shape[2]


def split_stats(
    q: torch.Tensor,
    q_pos: torch.Tensor,
    caches: LayerSet,
    row: torch.Tensor,
    n: int,
    scale: float,
    group: int,
    window_rows: int,
    vis: torch.Tensor | None = None,
    causal: bool = False,
) -> SplitStats:
    """Launch the statistics pass (inputs already validated; ``n > 0``, ``R > 0``).

    Rows ``[0, window_rows)`` of ``q``/``q_pos`` are window rows, the rest entropy rows
    (``vis``: the ``[n]`` bool modality mask, required when there are entropy rows).
    """
    cache, layout = caches.base, caches.layout
    h_kv, d, device = caches.num_heads, layout.head_size, cache.device
    rows = q.shape[1]
    entropy_rows = rows - window_rows
    if entropy_rows and vis is None:
        raise ValueError("entropy rows need the modality mask")
    has_vis = entropy_rows > 0
    dot_fp32 = dot_in_fp32(q.dtype, cache.dtype, device)
    block_r, block_n, warps = _row_tiles(
        group * window_rows, group * entropy_rows, dot_fp32, device
    )
    window_blocks = triton.cdiv(group * window_rows, block_r)
    row_blocks = window_blocks + triton.cdiv(group * entropy_rows, block_r)
    keys_per_split, splits = plan_splits(n, block_n, h_kv * row_blocks, device)
    m = torch.empty((h_kv, splits, group * rows), dtype=torch.float32, device=device)
    z = torch.empty_like(m)
    t = torch.empty_like(m) if has_vis else None
    dispatch.launchable(_split_stats_kernel, device)[(row_blocks, splits, h_kv)](
        q,
        q_pos,
        vis.view(torch.uint8) if has_vis else m,  # bool mask; not read without entropy rows
        cache,
        row,
        m,
        z,
        t if has_vis else m,  # not written without entropy rows
        n,
        window_rows,
        entropy_rows,
        window_blocks,
        keys_per_split,
        *q.stride(),
        *layout.k_args(caches.head_offsets),
        scale * LOG2E,
        GROUP=group,
        HAS_VIS=has_vis,
        CAUSAL=bool(causal),
        BLOCK_SIZE=layout.block_size,
        HEAD_ALIGN=caches.head_align,
        HEAD_SIZE=d,
        DOT_FP32=dot_fp32,
        BLOCK_R=block_r,
        BLOCK_N=block_n,
        BLOCK_D=max(16, triton.next_power_of_2(d)),
        num_warps=warps,
    )
    return SplitStats(m, z, t, splits, group, window_rows)
