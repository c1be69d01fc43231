"""Merge evicted tokens into their most similar kept token (MEDA / LOOK-M merging).

Per KV head, every evicted position ``e`` (a position in ``[0, n)`` not in ``kept[h]``) is
matched to ``argmax_j cos(k_e, k_kept[j])`` (ties: lowest ``j``). Since ``|k_e|`` does not
change the argmax, the similarity computed is ``(k_e . k_j) / max(|k_j|, 1e-8)``, dot
products accumulated in fp32 (the same in the kernel and the reference, so both pick the
same match up to fp32 rounding of near-ties). Then

* ``average``:  x_new[j] = (x_j + sum_{e -> j} x_e) / (1 + count_j)
* ``weighted``: x_new[j] = (s_j x_j + sum s_e x_e) / (s_j + sum s_e), ``s = scores``
  (non-negative attention scores); a group whose weights are all 0 falls back to average,

for K and V alike, accumulated in fp32, returned in the cache dtype. A kept token with
nothing matched is returned bit-exactly.

Kernels:

1. ``_match_kernel``, one program per (tile of evicted tokens, KV head): a running
   argmax over tiles of kept keys (a GEMM-shaped scan: ``E*S*D`` MACs per head, kept keys
   re-read from L2 once per evicted tile);
2. torch: a stable sort of the matches makes each kept token's evicted set a contiguous,
   position-ordered segment (deterministic sums, no atomics);
3. ``_accumulate_kernel``, one program per (kept token, KV head): sums its segment.

Traffic: K read ~twice, V once (``(2+1)*n*H_kv*D`` elements), output ``2*S*H_kv*D``.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import triton
import triton.language as tl

from .dispatch import dot_in_fp32, launchable, match_tiles, resolve_backend
from .gather import _launch as _gather_launch
from .gather import gather_kv_at_reference, per_layer
from .layout import CacheSet, PagedKVLayout, check_caches, check_positions, check_row
from .tiles import kv_offsets, load_k_tile, page_slots

MERGE_MODES = ("average", "weighted")
NORM_EPS = 1e-8


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


@triton.jit
def _accumulate_kernel(
    cache_ptr,
    row_ptr,
    kept_ptr,
    kept_k_ptr,
    kept_v_ptr,
    sorted_pos_ptr,
    starts_ptr,
    counts_ptr,
    scores_ptr,
    out_k_ptr,
    out_v_ptr,
    num_kept,
    num_evicted,
    scores_stride_h,
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
    WEIGHTED: tl.constexpr,
    ROUND_BF16: tl.constexpr,
    BLOCK_E: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    j = tl.program_id(0)
    head = tl.program_id(1).to(tl.int64)
    offs_d = tl.arange(0, BLOCK_D)
    mask_d = offs_d < HEAD_SIZE

    seg = head * num_kept + j
    x_k = tl.load(kept_k_ptr + seg * HEAD_SIZE + offs_d, mask=mask_d).to(tl.float32)
    x_v = tl.load(kept_v_ptr + seg * HEAD_SIZE + offs_d, mask=mask_d).to(tl.float32)

    start = tl.load(starts_ptr + seg)
    count = tl.load(counts_ptr + seg)
    sum_k = tl.zeros([BLOCK_D], tl.float32)
    sum_v = tl.zeros([BLOCK_D], tl.float32)
    wsum_k = tl.zeros([BLOCK_D], tl.float32)
    wsum_v = tl.zeros([BLOCK_D], tl.float32)
    w_total = tl.sum(tl.zeros([BLOCK_E], tl.float32), 0)
    for e_lo in range(0, count, BLOCK_E):
        offs_e = e_lo + tl.arange(0, BLOCK_E)
        mask_e = offs_e < count
        pos_e = tl.load(
            sorted_pos_ptr + head * num_evicted + start + offs_e, mask=mask_e, other=0
        ).to(tl.int64)
        base_e, slot_e = page_slots(
            row_ptr, pos_e, mask_e, head, block_stride, head_off_ptr, BLOCK_SIZE, HEAD_ALIGN
        )
        k_addr, v_addr = kv_offsets(
            base_e, slot_e, offs_d,
            k_offset, k_token_stride, k_dim_stride, v_offset, v_token_stride, v_dim_stride,
        )  # fmt: skip
        mask = mask_e[:, None] & mask_d[None, :]
        e_k = tl.load(cache_ptr + k_addr, mask=mask, other=0.0).to(tl.float32)
        e_v = tl.load(cache_ptr + v_addr, mask=mask, other=0.0).to(tl.float32)
        sum_k += tl.sum(e_k, 0)
        sum_v += tl.sum(e_v, 0)
        if WEIGHTED:
            w = tl.load(scores_ptr + head * scores_stride_h + pos_e, mask=mask_e, other=0.0)
            wsum_k += tl.sum(e_k * w[:, None], 0)
            wsum_v += tl.sum(e_v * w[:, None], 0)
            w_total += tl.sum(w, 0)

    denom = (count + 1).to(tl.float32)
    new_k = (x_k + sum_k) / denom
    new_v = (x_v + sum_v) / denom
    if WEIGHTED:
        pos = tl.load(kept_ptr + seg).to(tl.int64)
        w_kept = tl.load(scores_ptr + head * scores_stride_h + pos)
        w_den = w_kept + w_total
        w_safe = tl.where(w_den > 0, w_den, 1.0)
        new_k = tl.where(w_den > 0, (w_kept * x_k + wsum_k) / w_safe, new_k)
        new_v = tl.where(w_den > 0, (w_kept * x_v + wsum_v) / w_safe, new_v)
    # nothing merged: return the kept token bit-exactly
    new_k = tl.where(count > 0, new_k, x_k)
    new_v = tl.where(count > 0, new_v, x_v)
    out = seg * HEAD_SIZE + offs_d
    if ROUND_BF16:
        # Round to nearest even on the fp32 bits, so the bf16 store below is exact. The GPU
        # cast rounds this way already; Triton's interpreter truncates, so do it by hand.
        bits_k = new_k.to(tl.int32, bitcast=True)
        bits_v = new_v.to(tl.int32, bitcast=True)
        bits_k = (bits_k + 0x7FFF + ((bits_k >> 16) & 1)) & -65536
        bits_v = (bits_v + 0x7FFF + ((bits_v >> 16) & 1)) & -65536
        new_k = bits_k.to(tl.float32, bitcast=True)
        new_v = bits_v.to(tl.float32, bitcast=True)
    tl.store(out_k_ptr + out, new_k, mask=mask_d)
    tl.store(out_v_ptr + out, new_v, mask=mask_d)


# ---------------------------------------------------------------------- helpers
def _evicted_positions(kept: torch.Tensor, n: int) -> torch.Tensor:
    """``[H_kv, n - S]`` ascending positions not in ``kept`` (no host synchronisation)."""
    h_kv, num_kept = kept.shape
    is_kept = torch.zeros((h_kv, n), dtype=torch.int8, device=kept.device)
    is_kept.scatter_(1, kept.long(), 1)
    order = torch.argsort(is_kept, dim=1, stable=True)
    return order[:, : n - num_kept]


def _segments(match: torch.Tensor, evicted: torch.Tensor, num_kept: int):
    """Sort evicted tokens by target: (positions sorted by target, segment starts, counts)."""
    order = torch.argsort(match, dim=1, stable=True)
    sorted_pos = torch.gather(evicted, 1, order)
    counts = torch.zeros((match.shape[0], num_kept), dtype=torch.int32, device=match.device)
    counts.scatter_add_(1, match.long(), torch.ones_like(match, dtype=torch.int32))
    starts = (torch.cumsum(counts, dim=1, dtype=torch.int32) - counts).contiguous()
    return sorted_pos.contiguous(), starts, counts


def _inverse_norms(kept_k: torch.Tensor) -> torch.Tensor:
    """``1 / max(|k|, eps)`` per kept key, fp32 ``[H_kv, S]`` (shared with the reference)."""
    return 1.0 / kept_k.float().pow(2).sum(-1).sqrt().clamp(min=NORM_EPS)


def _launch_match(caches: CacheSet, row, kept_k, evicted):
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
    launchable(_match_kernel, device)[(triton.cdiv(num_evicted, block_e), h_kv)](
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


def _launch(caches: CacheSet, row, n, kept, mode, scores):
    cache, layout = caches.base, caches.layout
    h_kv, num_kept = kept.shape
    d = layout.head_size
    device = cache.device
    kept = kept.contiguous()
    kept_k, kept_v = _gather_launch(caches, row, kept, num_kept)  # dense [H_kv, S, D]
    if num_kept == 0 or num_kept == n:
        return kept_k, kept_v
    evicted = _evicted_positions(kept, n)
    match = _launch_match(caches, row, kept_k, evicted)
    sorted_pos, starts, counts = _segments(match, evicted, num_kept)
    weighted = mode == "weighted"
    if weighted:
        scores = scores.float()
        if scores.stride(1) != 1:
            scores = scores.contiguous()
    out_k = torch.empty_like(kept_k)
    out_v = torch.empty_like(kept_v)
    launchable(_accumulate_kernel, device)[(num_kept, h_kv)](
        cache,
        row,
        kept,
        kept_k,
        kept_v,
        sorted_pos,
        starts,
        counts,
        scores if weighted else starts,
        out_k,
        out_v,
        num_kept,
        sorted_pos.shape[1],
        scores.stride(0) if weighted else 0,
        *layout.kv_args(caches.head_offsets),
        BLOCK_SIZE=layout.block_size,
        HEAD_ALIGN=caches.head_align,
        HEAD_SIZE=d,
        WEIGHTED=weighted,
        ROUND_BF16=cache.dtype == torch.bfloat16,
        BLOCK_E=16,
        BLOCK_D=triton.next_power_of_2(d),
        num_warps=2,
    )
    return out_k, out_v


# ---------------------------------------------------------------------- references
def merge_match_reference(cache, layout: PagedKVLayout, row, n, kept):
    """``(evicted [H_kv, n-S], match [H_kv, n-S])``: target kept index of every evicted token."""
    evicted = _evicted_positions(kept, n)
    h_kv, num_evicted = evicted.shape
    match = torch.zeros((h_kv, num_evicted), dtype=torch.int64, device=cache.device)
    if num_evicted == 0:
        return evicted, match
    kept_k = gather_kv_at_reference(cache, layout, row, kept)[0]  # [H, S, D]
    inv_norm = _inverse_norms(kept_k)
    kept_k = kept_k.float()
    chunk = max(1, (1 << 24) // max(1, h_kv * kept.shape[1]))
    for lo in range(0, num_evicted, chunk):
        hi = min(num_evicted, lo + chunk)
        k_ev = gather_kv_at_reference(cache, layout, row, evicted[:, lo:hi])[0].float()
        sim = torch.bmm(k_ev, kept_k.transpose(1, 2)) * inv_norm[:, None, :]
        match[:, lo:hi] = sim.argmax(dim=-1)  # first maximum on ties
    return evicted, match


def paged_merge_reference(
    cache, layout: PagedKVLayout, row, n, kept, mode="average", scores=None, *, matched=None
):
    """Torch reference of :func:`paged_merge` (also the CPU path).

    ``matched``: ``merge_match_reference``'s ``(evicted, match)`` for these arguments, when
    the caller has it already (the match is the expensive part: ``E x S`` dot products).
    """
    h_kv, num_kept = kept.shape
    x_k, x_v = gather_kv_at_reference(cache, layout, row, kept)
    if num_kept == 0 or num_kept == n:
        return x_k.clone(), x_v.clone()
    if matched is None:
        matched = merge_match_reference(cache, layout, row, n, kept)
    evicted, match = matched
    e_k, e_v = gather_kv_at_reference(cache, layout, row, evicted)
    d = layout.head_size
    target = (match + torch.arange(h_kv, device=cache.device)[:, None] * num_kept).flatten()
    counts = torch.zeros(h_kv * num_kept, device=cache.device)
    counts.index_add_(0, target, torch.ones_like(target, dtype=torch.float32))
    counts = counts.view(h_kv, num_kept, 1)
    outs = []
    for x, e in ((x_k, e_k), (x_v, e_v)):
        x, e = x.float(), e.float()
        summed = torch.zeros(h_kv * num_kept, d, device=cache.device)
        summed.index_add_(0, target, e.reshape(-1, d))
        new = (x + summed.view(h_kv, num_kept, d)) / (1.0 + counts)
        if mode == "weighted":
            s = scores.float()
            w_kept = torch.gather(s, 1, kept.long())[..., None]
            w_ev = torch.gather(s, 1, evicted)
            w_total = torch.zeros(h_kv * num_kept, device=cache.device)
            w_total.index_add_(0, target, w_ev.flatten())
            w_sum = torch.zeros(h_kv * num_kept, d, device=cache.device)
            w_sum.index_add_(0, target, (e * w_ev[..., None]).reshape(-1, d))
            den = w_kept + w_total.view(h_kv, num_kept, 1)
            weighted = (w_kept * x + w_sum.view(h_kv, num_kept, d)) / den.clamp(min=1e-30)
            new = torch.where(den > 0, weighted, new)
        new = torch.where(counts > 0, new, x)
        outs.append(new.to(cache.dtype))
    return outs[0], outs[1]


# ---------------------------------------------------------------------- public ops
def _check(cache, layout, row, n, kept) -> CacheSet:
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
    if resolve_backend(backend, caches.device) == "torch":
        return per_layer(caches, lambda c, k: merge_match_reference(c, layout, row, n, k), kept)
    kept = kept.contiguous()
    evicted = _evicted_positions(kept, n)
    kept_k = _gather_launch(caches, row, kept, kept.shape[1])[0]
    return evicted, _launch_match(caches, row, kept_k, evicted).long()


def paged_merge(
    cache: torch.Tensor | Sequence[torch.Tensor],
    layout: PagedKVLayout,
    row: torch.Tensor,
    n: int,
    kept: torch.Tensor,
    mode: str = "average",
    scores: torch.Tensor | None = None,
    *,
    backend: str | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Merged K and V of the kept tokens, each ``[H_kv, S, D]`` in the cache dtype.

    ``kept [H_kv, S]`` strictly ascending positions per head; ``scores [H_kv, n]``
    (non-negative) is required for ``mode="weighted"``. A sequence of ``L`` layer caches
    merges all layers in one set of launches, every head-major tensor ``[L * H_kv, ...]``.
    """
    caches = _check(cache, layout, row, n, kept)
    heads = caches.num_heads
    if mode not in MERGE_MODES:
        raise ValueError(f"mode must be one of {MERGE_MODES}, got {mode!r}")
    if mode == "weighted":
        if scores is None:
            raise ValueError('mode="weighted" needs scores [H_kv, n]')
        if (
            not isinstance(scores, torch.Tensor)
            or not scores.is_floating_point()
            or tuple(scores.shape) != (heads, n)
        ):
            raise ValueError(f"scores must be a float [{heads}, {n}] tensor")
        if scores.device != caches.device:
            raise ValueError(f"scores is on {scores.device} but cache is on {caches.device}")
    if resolve_backend(backend, caches.device) == "torch":
        return per_layer(
            caches,
            lambda c, k, s: paged_merge_reference(c, layout, row, n, k, mode, s),
            kept,
            scores if scores is not None else [None] * caches.num_layers,
        )
    return _launch(caches, row, n, kept, mode, scores)
