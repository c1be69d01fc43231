"""Compact one request's paged KV in place: kept token ``j`` of head ``h`` moves to slot ``j``.

For every KV head ``h`` and ``j < P``, logical slot ``j`` (page ``row[j // bs]``, slot
``j % bs``) receives token ``kept[h, j]`` of the same head, or ``new_k/new_v[h, j]``
(e.g. merged values) when given. Afterwards the request's first ``P`` slots hold the
compressed cache and the blocks past ``ceil(P / bs)`` can be freed.

Overlap: sources and destinations live in the same pages (``kept[h, j] >= j``), and the
Triton programs run in no guaranteed order, so a program could overwrite a slot another
program has not read yet. The sources are therefore always staged first: values taken
from the cache are gathered into a dense ``[H_kv, P, D]`` workspace (one kernel launch
finishes all reads before the write kernel starts), then written back. Merged values
(``new_k``/``new_v``, fresh tensors) need no staging.

Traffic: with ``new_k`` and ``new_v``: read ``2*P*H_kv*D`` + write the same. From the
cache: twice that (gather to workspace, then write back).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import triton
import triton.language as tl

from . import dispatch
from .dispatch import copy_tile_tokens, resolve_backend
from .gather import _launch as _gather_launch
from .gather import gather_kv_at_reference
from .layout import FLOAT_DTYPES, LayerSet, PagedKVLayout, check_caches, check_positions, check_row
from .tiles import kv_offsets, page_slots


@triton.jit
def _write_kernel(
    cache_ptr,
    row_ptr,
    src_k_ptr,
    src_v_ptr,
    num_tokens,
    src_k_stride_h,
    src_k_stride_t,
    src_k_stride_d,
    src_v_stride_h,
    src_v_stride_t,
    src_v_stride_d,
    block_stride,
    head_off_ptr,
    k_offset,
    k_token_stride,
    k_dim_stride,
    v_offset,
    v_token_stride,
    v_dim_stride,
    BLOCK_SIZE: tl.constexpr,
    HEAD_ALIGN: tl.constexpr,
    HEAD_SIZE: tl.constexpr,
    BLOCK_T: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    head = tl.program_id(1).to(tl.int64)
    slots = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    mask_t = slots < num_tokens
    offs_d = tl.arange(0, BLOCK_D)
    mask = mask_t[:, None] & (offs_d < HEAD_SIZE)[None, :]
    tok = slots.to(tl.int64)

    k = tl.load(
        src_k_ptr
        + head * src_k_stride_h
        + tok[:, None] * src_k_stride_t
        + offs_d[None, :] * src_k_stride_d,
        mask=mask,
    )
    v = tl.load(
        src_v_ptr
        + head * src_v_stride_h
        + tok[:, None] * src_v_stride_t
        + offs_d[None, :] * src_v_stride_d,
        mask=mask,
    )
    base, slot = page_slots(
        row_ptr, tok, mask_t, head, block_stride, head_off_ptr, BLOCK_SIZE, HEAD_ALIGN
    )
    k_addr, v_addr = kv_offsets(
        base, slot, offs_d,
        k_offset, k_token_stride, k_dim_stride, v_offset, v_token_stride, v_dim_stride,
    )  # fmt: skip
    tl.store(cache_ptr + k_addr, k, mask=mask)
    tl.store(cache_ptr + v_addr, v, mask=mask)


def _launch_write(caches: LayerSet, row, src_k, src_v):
    cache, layout = caches.base, caches.layout
    h_kv, num_tokens, d = src_k.shape
    if num_tokens == 0:
        return
    block_t = copy_tile_tokens(cache)
    dispatch.launchable(_write_kernel, cache.device)[(triton.cdiv(num_tokens, block_t), h_kv)](
        cache,
        row,
        src_k,
        src_v,
        num_tokens,
        *src_k.stride(),
        *src_v.stride(),
        *layout.kv_args(caches.head_offsets),
        BLOCK_SIZE=layout.block_size,
        HEAD_ALIGN=caches.head_align,
        HEAD_SIZE=d,
        BLOCK_T=block_t,
        BLOCK_D=triton.next_power_of_2(d),
    )


def compact_reference_(cache, layout: PagedKVLayout, row, kept, new_k=None, new_v=None):
    """Torch reference of :func:`compact_` (also the CPU path). Modifies ``cache``."""
    h_kv, num_tokens = kept.shape
    if num_tokens == 0:
        return
    if new_k is None or new_v is None:
        gathered = gather_kv_at_reference(cache, layout, row, kept)  # staged copy
        new_k = gathered[0] if new_k is None else new_k
        new_v = gathered[1] if new_v is None else new_v
    slots = torch.arange(num_tokens, device=cache.device)
    pages = row.long()[slots // layout.block_size][None, :]
    heads = torch.arange(h_kv, device=cache.device)[:, None]
    within = (slots % layout.block_size)[None, :]
    layout.k_view(cache)[pages, heads, within] = new_k.to(cache.dtype)
    layout.v_view(cache)[pages, heads, within] = new_v.to(cache.dtype)


def compact_(
    cache: torch.Tensor | Sequence[torch.Tensor],
    layout: PagedKVLayout,
    row: torch.Tensor,
    kept: torch.Tensor,
    new_k: torch.Tensor | None = None,
    new_v: torch.Tensor | None = None,
    *,
    backend: str | None = None,
) -> None:
    """In place: slot ``j`` of head ``h`` <- token ``kept[h, j]`` (or ``new_k/new_v[h, j]``).

    ``kept [H_kv, P]`` strictly ascending positions per head; ``new_k``/``new_v`` optional
    ``[H_kv, P, D]`` float tensors (cast to the cache dtype), each independent of the other.
    A sequence of ``L`` layer caches compacts them all in one launch: ``kept`` and
    ``new_k``/``new_v`` are then ``[L * H_kv, ...]`` (layer-major, see ``LayerSet``).
    """
    caches = check_caches(cache, layout)
    cache = caches.base
    limit = row.shape[0] * layout.block_size if isinstance(row, torch.Tensor) else 0
    check_row(row, cache, layout, limit)
    check_positions(kept, "kept", caches.num_heads, limit, cache.device)
    want = (caches.num_heads, kept.shape[1], layout.head_size)
    for name, t in (("new_k", new_k), ("new_v", new_v)):
        if t is None:
            continue
        if not isinstance(t, torch.Tensor) or t.dtype not in FLOAT_DTYPES:
            raise ValueError(f"{name} must be a float16/bfloat16/float32 tensor")
        if tuple(t.shape) != want:
            raise ValueError(f"{name} must have shape {want}, got {tuple(t.shape)}")
        if t.device != cache.device:
            raise ValueError(f"{name} is on {t.device} but cache is on {cache.device}")
    if resolve_backend(backend, cache.device) == "torch":
        parts = zip(caches.tensors, *(caches.split(t) for t in (kept, new_k, new_v)), strict=True)
        for c, p, k, v in parts:
            compact_reference_(c, layout, row, p, k, v)
        return
    if kept.shape[1] == 0:
        return
    if new_k is None or new_v is None:
        # stage every read from the cache before the first write (see module docstring)
        gathered = _gather_launch(caches, row, kept, kept.shape[1])
        new_k = gathered[0] if new_k is None else new_k
        new_v = gathered[1] if new_v is None else new_v
    # sources in another dtype are rounded by torch (round-to-nearest-even everywhere)
    _launch_write(caches, row, new_k.to(cache.dtype), new_v.to(cache.dtype))
