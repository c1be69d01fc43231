"""MEDA's cross-modal attention entropy of one layer, straight from the paged cache.

For each query row ``r`` (prompt position ``q_pos[r]``) and query head: if the row is a
text position its keys are restricted to the *visual* positions, if it is a visual
position to the *text* positions (optionally also ``key <= q_pos[r]`` with
``causal=True``). The row entropy of the softmax over that restricted set is computed in
one streaming pass with

    H = m + log Z - T / Z = log Z' - T' / Z'   (relative form, Z' = sum e^(s-m),
                                                T' = sum e^(s-m) (s-m))

which is linear in ``n`` and never stores probabilities. Rows whose restricted set is
empty are skipped. Output ``[2]`` fp32: (mean over text rows, mean over visual rows),
each averaged over query heads; a direction without a row that sees a key gives NaN
(as the core's ``entropy.cross_modal_entropy``: MEDA then falls back to uniform budgets).
``E_l`` is their sum.

Kernels: split-K partial (m, Z', T') per (KV head, key chunk, row) in base 2, one program
per (row block, key chunk, KV head) with the row blocks neighbours in the grid, then one
small program per layer folds the chunks, the rows and the heads. Traffic: K read once
from DRAM (``n*H_kv*D`` elements; the row blocks of a chunk share it in L2) plus ``n``
mask bytes.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import triton
import triton.language as tl

from .dispatch import dot_in_fp32, dot_tiles, launchable, plan_splits, resolve_backend
from .gather import gather_pages_reference
from .layout import CacheSet, PagedKVLayout, check_caches, check_queries, check_row
from .tiles import load_k_tile, load_query_rows

LOG2E = 1.4426950408889634


@triton.jit
def _entropy_partial_kernel(
    q_ptr,
    q_pos_ptr,
    vis_ptr,
    cache_ptr,
    row_ptr,
    m_ptr,
    z_ptr,
    t_ptr,
    n,
    rows_per_head,
    group_rows,
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
    CAUSAL: tl.constexpr,
    BLOCK_SIZE: tl.constexpr,
    HEAD_ALIGN: tl.constexpr,
    HEAD_SIZE: tl.constexpr,
    DOT_FP32: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    # Row blocks vary fastest in the grid (as in window_scores' row statistics): the
    # programs of one key chunk share its K through L2.
    row_lo = tl.program_id(0) * BLOCK_R
    split = tl.program_id(1)
    num_splits = tl.num_programs(1)
    kv_head = tl.program_id(2)
    offs_d = tl.arange(0, BLOCK_D)
    mask_d = offs_d < HEAD_SIZE
    key_lo = split * keys_per_split
    key_hi = tl.minimum(key_lo + keys_per_split, n)
    head = kv_head.to(tl.int64)

    rr = row_lo + tl.arange(0, BLOCK_R)
    mask_r = rr < group_rows
    q, r = load_query_rows(
        q_ptr, kv_head, rr, mask_r, offs_d, mask_d, rows_per_head,
        q_stride_h, q_stride_r, q_stride_d, GROUP, DOT_FP32,
    )  # fmt: skip
    q_pos = tl.load(q_pos_ptr + r, mask=mask_r, other=0).to(tl.int64)
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
        key_vis = tl.load(vis_ptr + keys, mask=mask_n, other=0) != 0
        if DOT_FP32:
            s = tl.dot(q, tl.trans(k.to(tl.float32)), input_precision="ieee")
        else:
            s = tl.dot(q, tl.trans(k))
        s = s * qk_scale
        # text rows see visual keys, visual rows see text keys
        visible = (key_vis[None, :] != row_vis[:, None]) & mask_n[None, :] & mask_r[:, None]
        if CAUSAL:
            visible = visible & (keys[None, :] <= q_pos[:, None])
        m_new = tl.maximum(m_i, tl.max(tl.where(visible, s, float("-inf")), 1))
        m_use = tl.where(m_new == float("-inf"), 0.0, m_new)
        diff = tl.where(visible, s - m_use[:, None], 0.0)
        p = tl.where(visible, tl.exp2(diff), 0.0)
        # rescale the old sums to the new max: T' -> a (T' + (m_old - m_new) Z')
        alpha = tl.exp2(m_i - m_use)
        shift = tl.where(z_i > 0, m_i - m_use, 0.0)
        t_i = alpha * (t_i + shift * z_i) + tl.sum(p * diff, 1)
        z_i = alpha * z_i + tl.sum(p, 1)
        m_i = m_new

    out = (kv_head * num_splits + split).to(tl.int64) * group_rows + rr
    tl.store(m_ptr + out, m_i, mask=mask_r)
    tl.store(z_ptr + out, z_i, mask=mask_r)
    tl.store(t_ptr + out, t_i, mask=mask_r)


@triton.jit
def _entropy_combine_kernel(
    m_ptr,
    z_ptr,
    t_ptr,
    q_pos_ptr,
    vis_ptr,
    out_ptr,
    num_kv_heads,
    rows_per_head,
    group_rows,
    num_splits,
    BLOCK_R: tl.constexpr,
):
    layer = tl.program_id(0)  # one program per layer of the set: heads [layer * H_kv, +H_kv)
    text_sum = tl.zeros([BLOCK_R], tl.float32)
    text_cnt = tl.zeros([BLOCK_R], tl.float32)
    vis_sum = tl.zeros([BLOCK_R], tl.float32)
    vis_cnt = tl.zeros([BLOCK_R], tl.float32)
    for kv_head in range(layer * num_kv_heads, (layer + 1) * num_kv_heads):
        for row_lo in range(0, group_rows, BLOCK_R):
            rr = row_lo + tl.arange(0, BLOCK_R)
            mask_r = rr < group_rows
            q_pos = tl.load(q_pos_ptr + rr % rows_per_head, mask=mask_r, other=0).to(tl.int64)
            row_vis = tl.load(vis_ptr + q_pos, mask=mask_r, other=0) != 0
            m_i = tl.full([BLOCK_R], float("-inf"), tl.float32)
            z_i = tl.zeros([BLOCK_R], tl.float32)
            t_i = tl.zeros([BLOCK_R], tl.float32)
            for split in range(0, num_splits):
                at = (kv_head * num_splits + split).to(tl.int64) * group_rows + rr
                m_s = tl.load(m_ptr + at, mask=mask_r, other=float("-inf"))
                z_s = tl.load(z_ptr + at, mask=mask_r, other=0.0)
                t_s = tl.load(t_ptr + at, mask=mask_r, other=0.0)
                m_new = tl.maximum(m_i, m_s)
                m_use = tl.where(m_new == float("-inf"), 0.0, m_new)
                a_i = tl.exp2(m_i - m_use)
                a_s = tl.exp2(m_s - m_use)
                shift_i = tl.where(z_i > 0, m_i - m_use, 0.0)
                shift_s = tl.where(z_s > 0, m_s - m_use, 0.0)
                t_i = a_i * (t_i + shift_i * z_i) + a_s * (t_s + shift_s * z_s)
                z_i = a_i * z_i + a_s * z_s
                m_i = m_new
            valid = mask_r & (z_i > 0)
            z_safe = tl.where(valid, z_i, 1.0)
            ent = (tl.log2(z_safe) - t_i / z_safe) * 0.6931471805599453
            is_text = valid & (row_vis == 0)
            is_vis = valid & (row_vis != 0)
            text_sum += tl.where(is_text, ent, 0.0)
            text_cnt += is_text.to(tl.float32)
            vis_sum += tl.where(is_vis, ent, 0.0)
            vis_cnt += is_vis.to(tl.float32)
    # every head has the same valid rows, so the mean over (head, row) pairs is the mean
    # over heads of the per-head row means
    t_total = tl.sum(text_sum, 0)
    t_count = tl.sum(text_cnt, 0)
    v_total = tl.sum(vis_sum, 0)
    v_count = tl.sum(vis_cnt, 0)
    out = out_ptr + 2 * layer
    tl.store(out, tl.where(t_count > 0, t_total / tl.maximum(t_count, 1.0), float("nan")))
    tl.store(out + 1, tl.where(v_count > 0, v_total / tl.maximum(v_count, 1.0), float("nan")))


def _launch(q, q_pos, caches: CacheSet, row, n, vis, scale, causal, group):
    """``[L, 2]`` per layer of the set."""
    cache, layout = caches.base, caches.layout
    h_kv, d = caches.num_heads, layout.head_size
    device = cache.device
    rows = q.shape[1]
    group_rows = group * rows
    if n == 0 or rows == 0:
        return torch.full((caches.num_layers, 2), float("nan"), dtype=torch.float32, device=device)
    out = torch.empty((caches.num_layers, 2), dtype=torch.float32, device=device)  # all written
    vis_u8 = vis.view(torch.uint8) if vis.dtype == torch.bool else vis.to(torch.uint8)
    block_d = max(16, triton.next_power_of_2(d))
    dot_fp32 = dot_in_fp32(q.dtype, cache.dtype, device)
    block_r, block_n, warps = dot_tiles(group_rows, dot_fp32, device)
    row_blocks = triton.cdiv(group_rows, block_r)
    keys_per_split, splits = plan_splits(n, block_n, h_kv * row_blocks, device)
    m = torch.empty((h_kv, splits, group_rows), dtype=torch.float32, device=device)
    z = torch.empty_like(m)
    t = torch.empty_like(m)
    launchable(_entropy_partial_kernel, device)[(row_blocks, splits, h_kv)](
        q,
        q_pos,
        vis_u8,
        cache,
        row,
        m,
        z,
        t,
        n,
        rows,
        group_rows,
        keys_per_split,
        *q.stride(),
        *layout.k_args(caches.head_offsets),
        scale * LOG2E,
        GROUP=group,
        CAUSAL=bool(causal),
        BLOCK_SIZE=layout.block_size,
        HEAD_ALIGN=caches.head_align,
        HEAD_SIZE=d,
        DOT_FP32=dot_fp32,
        BLOCK_R=block_r,
        BLOCK_N=block_n,
        BLOCK_D=block_d,
        num_warps=warps,
    )
    launchable(_entropy_combine_kernel, device)[(caches.num_layers,)](
        m,
        z,
        t,
        q_pos,
        vis_u8,
        out,
        layout.num_kv_heads,
        rows,
        group_rows,
        splits,
        BLOCK_R=min(1024, triton.next_power_of_2(group_rows)),
    )
    return out


# ---------------------------------------------------------------------- reference
def paged_cross_modal_entropy_reference(
    q, q_pos, cache, layout: PagedKVLayout, row, n, vis, scale=None, causal=False
):
    """Torch reference of :func:`paged_cross_modal_entropy` (also the CPU path)."""
    h_kv, d = layout.num_kv_heads, layout.head_size
    scale = 1.0 / math.sqrt(d) if scale is None else float(scale)
    heads, rows, _ = q.shape
    group = heads // h_kv
    out = torch.full((2,), float("nan"), dtype=torch.float32, device=cache.device)
    if n == 0 or rows == 0:
        return out
    k = gather_pages_reference(layout.k_view(cache), layout, row, n).float()
    qg = q.float().reshape(h_kv, group, rows, d)
    vis = vis[:n].bool()
    pos = q_pos.long()
    keys = torch.arange(n, device=cache.device)
    sums = torch.zeros(2, dtype=torch.float64, device=cache.device)
    counts = torch.zeros(2, dtype=torch.float64, device=cache.device)
    chunk = max(1, (1 << 24) // max(1, heads * n))
    for lo in range(0, rows, chunk):
        hi = min(rows, lo + chunk)
        row_vis = vis[pos[lo:hi]]
        allowed = vis[None, :] != row_vis[:, None]  # [r, n]
        if causal:
            allowed = allowed & (keys[None, :] <= pos[lo:hi, None])
        s = torch.einsum("hgrd,hnd->hgrn", qg[:, :, lo:hi], k) * scale
        logp = torch.log_softmax(s.masked_fill(~allowed, float("-inf")), dim=-1)
        ent = -torch.where(allowed, logp.exp() * logp, 0.0).sum(-1)  # [H_kv, g, r]
        valid = allowed.any(-1)
        for direction, rows_mask in enumerate((valid & ~row_vis, valid & row_vis)):
            sums[direction] += ent[:, :, rows_mask].double().sum()
            counts[direction] += float(rows_mask.sum()) * heads
    return torch.where(counts > 0, sums / counts.clamp(min=1), float("nan")).float()


# ---------------------------------------------------------------------- public op
def paged_cross_modal_entropy(
    q: torch.Tensor,
    q_pos: torch.Tensor,
    cache: torch.Tensor | Sequence[torch.Tensor],
    layout: PagedKVLayout,
    row: torch.Tensor,
    n: int,
    vis: torch.Tensor,
    scale: float | None = None,
    causal: bool = False,
    *,
    backend: str | None = None,
) -> torch.Tensor:
    """(text->visual, visual->text) mean row entropies in nats, fp32 ``[2]``.

    ``q [H, R, D]`` sampled query rows at prompt positions ``q_pos [R]`` (in ``[0, n)``),
    ``vis [n]`` bool modality mask (True = image/video token). MEDA's ``E_l = out.sum()``.
    A sequence of ``L`` layer caches (``q [L * H, R, D]``, layer-major) gives ``[L, 2]``
    in one pass (see ``CacheSet``).
    """
    caches = check_caches(cache, layout)
    cache = caches.base
    check_row(row, cache, layout, n)
    group = check_queries(q, q_pos, caches, n)
    if not isinstance(vis, torch.Tensor) or vis.dim() != 1 or vis.dtype != torch.bool:
        raise ValueError("vis must be a 1-D bool tensor (True = visual position)")
    if vis.shape[0] != n:
        raise ValueError(f"vis has {vis.shape[0]} entries, expected n = {n}")
    if vis.device != cache.device:
        raise ValueError(f"vis is on {vis.device} but cache is on {cache.device}")
    scale = 1.0 / math.sqrt(layout.head_size) if scale is None else float(scale)
    if resolve_backend(backend, cache.device) == "torch":
        out = torch.stack([
            paged_cross_modal_entropy_reference(ql, q_pos, c, layout, row, n, vis, scale, causal)
            for c, ql in zip(caches.tensors, q.chunk(caches.num_layers, dim=0), strict=True)
        ])  # fmt: skip
    else:
        out = _launch(q, q_pos, caches, row, n, vis, scale, causal, group)
    return out if caches.is_set else out[0]
