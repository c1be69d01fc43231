"""Gather one request's K and V out of the paged cache into dense ``[H_kv, P, D]`` tensors.

Token ``i`` of the request lives at page ``row[i // block_size]``, slot ``i % block_size``.
``gather_kv`` takes the first ``n`` tokens; ``gather_kv_at`` takes per-head positions
``[H_kv, P]`` (used by merging and compaction). Traffic: read ``P*H_kv*D`` elements of K
and of V, write the same amount.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import triton
import triton.language as tl

from . import dispatch
from .dispatch import copy_tile_tokens, resolve_backend
from .layout import LayerSet, PagedKVLayout, check_caches, check_positions, check_row
from .tiles import kv_offsets, page_slots


@triton.jit
def _gather_kernel(
    cache_ptr,
    row_ptr,
    pos_ptr,
    out_k_ptr,
    out_v_ptr,
    num_tokens,
    pos_stride_h,
    block_stride,
    head_off_ptr,
    k_offset,
    k_token_stride,
    k_dim_stride,
    v_offset,
    v_token_stride,
    v_dim_stride,
    out_stride_h,
    out_stride_t,
    BLOCK_SIZE: tl.constexpr,
    HEAD_ALIGN: tl.constexpr,
    HEAD_SIZE: tl.constexpr,
    HAS_POS: tl.constexpr,
    BLOCK_T: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    pid_t = tl.program_id(0)
    head = tl.program_id(1).to(tl.int64)
    offs_t = pid_t * BLOCK_T + tl.arange(0, BLOCK_T)
    mask_t = offs_t < num_tokens
    if HAS_POS:
        tok = tl.load(pos_ptr + head * pos_stride_h + offs_t, mask=mask_t, other=0).to(tl.int64)
    else:
        tok = offs_t.to(tl.int64)
    base, slot = page_slots(
        row_ptr, tok, mask_t, head, block_stride, head_off_ptr, BLOCK_SIZE, HEAD_ALIGN
    )
    offs_d = tl.arange(0, BLOCK_D)
    mask = mask_t[:, None] & (offs_d < HEAD_SIZE)[None, :]
    k_addr, v_addr = kv_offsets(
        base, slot, offs_d,
        k_offset, k_token_stride, k_dim_stride, v_offset, v_token_stride, v_dim_stride,
    )  # fmt: skip
    k = tl.load(cache_ptr + k_addr, mask=mask)
    v = tl.load(cache_ptr + v_addr, mask=mask)

    out = head * out_stride_h + offs_t.to(tl.int64)[:, None] * out_stride_t + offs_d[None, :]
    tl.store(out_k_ptr + out, k, mask=mask)
    tl.store(out_v_ptr + out, v, mask=mask)


def _launch(caches: LayerSet, row, positions, num_tokens: int):
    """``[heads, num_tokens, D]`` K and V of every head of the set (the first tokens, or
    ``positions [heads, P]``)."""
    layout, cache = caches.layout, caches.base
    h_kv, d = caches.num_heads, layout.head_size
    out_k = torch.empty((h_kv, num_tokens, d), dtype=cache.dtype, device=cache.device)
    out_v = torch.empty_like(out_k)
    if num_tokens == 0:
        return out_k, out_v
    has_pos = positions is not None
    if has_pos:
        positions = positions.contiguous()
    block_t = copy_tile_tokens(cache)
    grid = (triton.cdiv(num_tokens, block_t), h_kv)
    dispatch.launchable(_gather_kernel, cache.device)[grid](
        cache,
        row,
        positions if has_pos else row,
        out_k,
        out_v,
        num_tokens,
        positions.stride(0) if has_pos else 0,
        *layout.kv_args(caches.head_offsets),
        out_k.stride(0),
        out_k.stride(1),
        BLOCK_SIZE=layout.block_size,
        HEAD_ALIGN=caches.head_align,
        HEAD_SIZE=d,
        HAS_POS=has_pos,
        BLOCK_T=block_t,
        BLOCK_D=triton.next_power_of_2(d),
    )
    return out_k, out_v


# ---------------------------------------------------------------------- references
def gather_pages_reference(view, layout: PagedKVLayout, row, n: int) -> torch.Tensor:
    """First ``n`` tokens of a ``[nb, H_kv, bs, D]`` page view as ``[H_kv, n, D]``."""
    blocks = row[: -(-n // layout.block_size)].long()
    pages = view[blocks]  # [nblk, H, bs, D]
    flat = pages.transpose(0, 1).reshape(layout.num_kv_heads, -1, layout.head_size)
    return flat[:, :n].contiguous()


def gather_kv_reference(cache, layout: PagedKVLayout, row, n: int):
    """Torch reference of :func:`gather_kv` (also the CPU path)."""
    return (
        gather_pages_reference(layout.k_view(cache), layout, row, n),
        gather_pages_reference(layout.v_view(cache), layout, row, n),
    )


def gather_kv_at_reference(cache, layout: PagedKVLayout, row, positions):
    """Torch reference of :func:`gather_kv_at` (also the CPU path)."""
    pos = positions.long()
    pages = row.long()[pos // layout.block_size]
    slots = pos % layout.block_size
    heads = torch.arange(layout.num_kv_heads, device=cache.device)[:, None]
    k = layout.k_view(cache)[pages, heads, slots]
    v = layout.v_view(cache)[pages, heads, slots]
    return k, v


# ---------------------------------------------------------------------- public ops
def per_layer(caches: LayerSet, fn, *head_major):
    """Run a one-layer reference ``fn(cache, *args)`` on every layer of the set, splitting
    the head-major ``[L * H_kv, ...]`` tensor arguments (a list: already one per layer);
    results (tensors or tuples of them) joined along heads."""
    parts = [t if isinstance(t, list) else caches.split(t) for t in head_major]
    outs = [fn(cache, *args) for cache, *args in zip(caches.tensors, *parts, strict=True)]
    if isinstance(outs[0], tuple):
        return tuple(torch.cat(list(x), dim=0) for x in zip(*outs, strict=True))
    return torch.cat(outs, dim=0)


def gather_kv(
    cache: torch.Tensor | Sequence[torch.Tensor],
    layout: PagedKVLayout,
    row: torch.Tensor,
    n: int,
    *,
    backend: str | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """K and V of the request's first ``n`` tokens, each ``[H_kv, n, D]`` in the cache dtype
    (``[L * H_kv, n, D]`` for a sequence of ``L`` layer caches, see ``LayerSet``)."""
    caches = check_caches(cache, layout)
    check_row(row, caches.base, layout, n)
    if resolve_backend(backend, caches.device) == "torch":
        return per_layer(caches, lambda c: gather_kv_reference(c, layout, row, n))
    return _launch(caches, row, None, n)


def gather_kv_at(
    cache: torch.Tensor | Sequence[torch.Tensor],
    layout: PagedKVLayout,
    row: torch.Tensor,
    positions: torch.Tensor,
    *,
    backend: str | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """K and V at per-head positions ``[H_kv, P]``, each ``[H_kv, P, D]`` (layer sets:
    ``[L * H_kv, ...]``)."""
    caches = check_caches(cache, layout)
    limit = row.shape[0] * layout.block_size if isinstance(row, torch.Tensor) else 0
    check_row(row, caches.base, layout, limit)
    check_positions(positions, "positions", caches.num_heads, limit, caches.device, ascending=False)
    if resolve_backend(backend, caches.device) == "torch":
        return per_layer(caches, lambda c, p: gather_kv_at_reference(c, layout, row, p), positions)
    return _launch(caches, row, positions, positions.shape[1])
