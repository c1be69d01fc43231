"""``@triton.jit`` helpers shared by the kernels: paged addressing and tile loads.

Triton inlines them into each kernel, so they cost nothing at run time; they exist so
that the page arithmetic of :class:`~.layout.PagedKVLayout` is written once. Offsets are
int64 (``block id * block_stride`` passes 2^31 on large pools).
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def page_slots(
    row_ptr,
    tok,
    mask,
    head,
    block_stride,
    head_off_ptr,
    BLOCK_SIZE: tl.constexpr,
    HEAD_ALIGN: tl.constexpr,
):
    """``(base, slot)`` of tokens ``tok`` of KV head ``head``: the element offset of their
    page and head (``row[tok // bs] * block_stride + head_offsets[head]``; ``head`` indexes
    a ``LayerSet``'s heads, so it may be a head of another layer's cache) and the slot in
    the page (``tok % bs``). ``HEAD_ALIGN``: a divisor of every head offset
    (``LayerSet.head_align``), so that the compiler still knows the row starts' alignment
    and vectorises the loads along the head dimension (as it did for an int head stride:
    without it, scalar loads spilled registers)."""
    page = tl.load(row_ptr + tok // BLOCK_SIZE, mask=mask, other=0).to(tl.int64)
    off = tl.load(head_off_ptr + head)
    if HEAD_ALIGN > 1:
        off = tl.multiple_of(off, HEAD_ALIGN)
    return page * block_stride + off, tok % BLOCK_SIZE


@triton.jit
def kv_offsets(
    base,
    slot,
    offs_d,
    k_offset,
    k_token_stride,
    k_dim_stride,
    v_offset,
    v_token_stride,
    v_dim_stride,
):
    """``[T, D]`` element offsets of K and V for the ``(base, slot)`` of :func:`page_slots`."""
    k = (base + k_offset + slot * k_token_stride)[:, None] + offs_d[None, :] * k_dim_stride
    v = (base + v_offset + slot * v_token_stride)[:, None] + offs_d[None, :] * v_dim_stride
    return k, v


@triton.jit
def load_k_tile(
    cache_ptr,
    row_ptr,
    tok,
    mask_t,
    head,
    offs_d,
    mask_d,
    block_stride,
    head_off_ptr,
    k_offset,
    k_token_stride,
    k_dim_stride,
    BLOCK_SIZE: tl.constexpr,
    HEAD_ALIGN: tl.constexpr,
):
    """``[T, BLOCK_D]`` keys of tokens ``tok`` (prompt positions) of KV head ``head``;
    masked rows and columns read 0."""
    base, slot = page_slots(
        row_ptr, tok, mask_t, head, block_stride, head_off_ptr, BLOCK_SIZE, HEAD_ALIGN
    )
    addr = base + k_offset + slot * k_token_stride
    return tl.load(
        cache_ptr + addr[:, None] + offs_d[None, :] * k_dim_stride,
        mask=mask_t[:, None] & mask_d[None, :],
        other=0.0,
    )


@triton.jit
def load_query_rows(
    q_ptr,
    kv_head,
    rr,
    mask_r,
    offs_d,
    mask_d,
    rows_per_head,
    row_base,
    q_stride_h,
    q_stride_r,
    q_stride_d,
    GROUP: tl.constexpr,
    DOT_FP32: tl.constexpr,
):
    """Rows ``rr`` of KV head ``kv_head``'s GQA group over the ``rows_per_head`` rows of
    ``q [H, R, D]`` from row ``row_base`` on, flattened so that ``rr`` is query head
    ``kv_head * GROUP + rr // rows_per_head``, row ``row_base + rr % rows_per_head``.

    Returns ``(q [BLOCK_R, BLOCK_D], r)``: the rows (widened to fp32 when the dot runs in
    fp32) and their row index ``r`` in ``q`` (to look up ``q_pos``).
    """
    q_head = kv_head * GROUP + rr // rows_per_head
    r = row_base + rr % rows_per_head
    q_addr = q_head.to(tl.int64) * q_stride_h + r * q_stride_r
    q = tl.load(
        q_ptr + q_addr[:, None] + offs_d[None, :] * q_stride_d,
        mask=mask_r[:, None] & mask_d[None, :],
        other=0.0,
    )
    if DOT_FP32:
        q = q.to(tl.float32)
    return q, r
