"""Match every evicted token to its most similar kept token (the first step of merging,
``merge.py``).

Per KV head, every evicted position ``e`` (a position in ``[0, n)`` not in ``kept[h]``) is
matched to ``argmax_j cos(k_e, k_kept[j])`` (ties: lowest ``j``). Since ``|k_e|`` does not
change the argmax, the similarity computed is ``(k_e . k_j) / max(|k_j|, 1e-8)``, dot
products accumulated in fp32 (the formula of the core's ``merging.nearest_kept``, the torch
path here, so both pick the same match up to fp32 rounding of near-ties).

``_match_kernel``, one program per (tile of evicted tokens, KV head): a running argmax over
tiles of kept keys (a GEMM-shaped scan: ``E*S*D`` MACs per head, kept keys re-read from L2
once per evicted tile).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import triton
import triton.language as tl

from meda_vllm.merging import NORM_EPS, evicted_positions, nearest_kept

from . import dispatch
from .dispatch import dot_in_fp32, match_tiles, resolve_backend
from .gather import _launch as _gather_launch
from .gather import gather_pages_reference, per_layer
from .layout import LayerSet, PagedKVLayout, check_caches, check_positions, check_row
from .tiles import load_k_tile


@triton.jit
def _match_kernel(
    cache_ptr,
    row_ptr,
    kept_k_ptr,
    inv_norm_ptr,
    evicted_ptr,
    match_ptr,
    num_kept,
    num_evicted,
    block_stride,
    head_off_ptr,
    k_offset,
    k_token_stride,
    k_dim_stride,
    BLOCK_SIZE: tl.constexpr,
    HEAD_ALIGN: tl.constexpr,
    HEAD_SIZE: tl.constexpr,
    DOT_FP32: tl.constexpr,
    BLOCK_E: tl.constexpr,
    BLOCK_S: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    head = tl.program_id(1).to(tl.int64)
    offs_e = tl.program_id(0) * BLOCK_E + tl.arange(0, BLOCK_E)
    mask_e = offs_e < num_evicted
    offs_d = tl.arange(0, BLOCK_D)
    mask_d = offs_d < HEAD_SIZE

    pos_e = tl.load(evicted_ptr + head * num_evicted + offs_e, mask=mask_e, other=0)
    k_e = load_k_tile(
        cache_ptr, row_ptr, pos_e.to(tl.int64), mask_e, head, offs_d, mask_d,
        block_stride, head_off_ptr, k_offset, k_token_stride, k_dim_stride,
        BLOCK_SIZE, HEAD_ALIGN,
    )  # fmt: skip
    if DOT_FP32:
        k_e = k_e.to(tl.float32)

    kept_base = head * num_kept * HEAD_SIZE
    best = tl.full([BLOCK_E], float("-inf"), tl.float32)
    best_idx = tl.zeros([BLOCK_E], tl.int32)
    for s_lo in range(0, num_kept, BLOCK_S):
        offs_s = s_lo + tl.arange(0, BLOCK_S)
        mask_s = offs_s < num_kept
        k_s = tl.load(
            kept_k_ptr + kept_base + offs_s.to(tl.int64)[:, None] * HEAD_SIZE + offs_d[None, :],
            mask=mask_s[:, None] & mask_d[None, :],
            other=0.0,
        )
        inv_norm = tl.load(inv_norm_ptr + head * num_kept + offs_s, mask=mask_s, other=0.0)
        if DOT_FP32:
            dots = tl.dot(k_e, tl.trans(k_s.to(tl.float32)), input_precision="ieee")
        else:
            dots = tl.dot(k_e, tl.trans(k_s))
        sim = tl.where(mask_s[None, :], dots * inv_norm[None, :], float("-inf"))
        tile_best = tl.max(sim, 1)
        tile_idx = tl.argmax(sim, 1, tie_break_left=True).to(tl.int32) + s_lo
        better = tile_best > best  # strict: earlier tiles (lower kept index) win ties
        best_idx = tl.where(better, tile_idx, best_idx)
        best = tl.where(better, tile_best, best)

    tl.store(match_ptr + head * num_evicted + offs_e, best_idx, mask=mask_e)


# ---------------------------------------------------------------------- helpers
def _inverse_norms(kept_k: torch.Tensor) -> torch.Tensor:
    """``1 / max(|k|, eps)`` per kept key, fp32 ``[H_kv, S]`` (as ``merging.nearest_kept``)."""
    return 1.0 / kept_k.float().pow(2).sum(-1).sqrt().clamp(min=NORM_EPS)


def _launch_match(caches: LayerSet, row, kept_k, evicted):
    cache, layout = caches.base, caches.layout
    h_kv, num_kept, _ = kept_k.shape
    num_evicted = evicted.shape[1]
    device = cache.device
    match = torch.empty((h_kv, num_evicted), dtype=torch.int32, device=device)
    if num_evicted == 0:
        return match
    evicted = evicted.contiguous()
    inv_norm = _inverse_norms(kept_k).contiguous()
    dot_fp32 = dot_in_fp32(cache.dtype, cache.dtype, device)
    block_e, block_s, warps = match_tiles(dot_fp32, device)
    dispatch.launchable(_match_kernel, device)[(triton.cdiv(num_evicted, block_e), h_kv)](
        cache,
        row,
        kept_k,
        inv_norm,
        evicted,
        match,
        num_kept,
        num_evicted,
        *layout.k_args(caches.head_offsets),
        BLOCK_SIZE=layout.block_size,
        HEAD_ALIGN=caches.head_align,
        HEAD_SIZE=layout.head_size,
        DOT_FP32=dot_fp32,
        BLOCK_E=block_e,
        BLOCK_S=block_s,
        BLOCK_D=max(16, triton.next_power_of_2(layout.head_size)),
        num_warps=warps,
    )
    return match


# ---------------------------------------------------------------------- public op
def _core_match(cache, layout: PagedKVLayout, row, n: int, kept):
    """``merge_match`` of one layer by the core (``merging.nearest_kept``) on gathered K."""
    evicted = evicted_positions(kept, n)
    keys = gather_pages_reference(layout.k_view(cache), layout, row, n)
    return evicted, nearest_kept(keys, kept.long(), evicted)


def _check(cache, layout, row, n, kept) -> LayerSet:
    caches = check_caches(cache, layout)
    check_row(row, caches.base, layout, n)
    check_positions(kept, "kept", caches.num_heads, n, caches.device)
    if kept.shape[1] > n:
        raise ValueError(f"kept has {kept.shape[1]} positions per head but n = {n}")
    if kept.shape[1] == 0 and n > 0:
        raise ValueError("kept is empty: evicted tokens would have nothing to merge into")
    return caches


def merge_match(
    cache: torch.Tensor | Sequence[torch.Tensor],
    layout: PagedKVLayout,
    row: torch.Tensor,
    n: int,
    kept: torch.Tensor,
    *,
    backend: str | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(evicted [H_kv, n-S] positions, match [H_kv, n-S] int64 index into kept)``
    (layer sets: ``[L * H_kv, ...]``)."""
    caches = _check(cache, layout, row, n, kept)
    if resolve_backend(backend, caches.device) == "torch":  # the core's own match
        return per_layer(caches, lambda c, k: _core_match(c, layout, row, n, k), kept)
    kept = kept.contiguous()
    evicted = evicted_positions(kept, n)
    kept_k = _gather_launch(caches, row, kept, kept.shape[1])[0]
    return evicted, _launch_match(caches, row, kept_k, evicted).long()
