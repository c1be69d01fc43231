"""Merge evicted tokens into their most similar kept token (MEDA / LOOK-M merging).

Per KV head, every evicted position ``e`` (a position in ``[0, n)`` not in ``kept[h]``) is
matched to ``argmax_j cos(k_e, k_kept[j])`` (ties: lowest ``j``). Since ``|k_e|`` does not
change the argmax, the similarity computed is ``(k_e . k_j) / max(|k_j|, 1e-8)``, dot
products accumulated in fp32 (as the core's ``merging.nearest_kept``). Then

* ``average``:  x_new[j] = (x_j + sum_{e -> j} x_e) / (1 + count_j)
* ``weighted``: x_new[j] = (s_j x_j + sum s_e x_e) / (s_j + sum s_e), ``s = scores``
  (non-negative attention scores); a group whose weights are all 0 falls back to average,

for K and V alike, accumulated in fp32, returned in the cache dtype. A kept token with
nothing matched is returned bit-exactly. The torch path is the core's
``merging.merge_into_kept``.

Steps:

1. ``match.py``: the target kept token of every evicted token;
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

from meda_vllm.merging import evicted_positions, merge_into_kept

from . import dispatch
from .dispatch import resolve_backend
from .gather import _launch as _gather_launch
from .gather import gather_kv_reference, per_layer
from .layout import LayerSet, PagedKVLayout
from .match import _check, _core_match, _launch_match
from .tiles import kv_offsets, page_slots

MERGE_MODES = ("average", "weighted")


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
def _segments(match: torch.Tensor, evicted: torch.Tensor, num_kept: int):
    """Sort evicted tokens by target: (positions sorted by target, segment starts, counts)."""
    order = torch.argsort(match, dim=1, stable=True)
    sorted_pos = torch.gather(evicted, 1, order)
    counts = torch.zeros((match.shape[0], num_kept), dtype=torch.int32, device=match.device)
    counts.scatter_add_(1, match.long(), torch.ones_like(match, dtype=torch.int32))
    starts = (torch.cumsum(counts, dim=1, dtype=torch.int32) - counts).contiguous()
    return sorted_pos.contiguous(), starts, counts


def _launch(caches: LayerSet, row, n, kept, mode, scores):
    cache, layout = caches.base, caches.layout
    h_kv, num_kept = kept.shape
    d = layout.head_size
    device = cache.device
    kept = kept.contiguous()
    kept_k, kept_v = _gather_launch(caches, row, kept, num_kept)  # dense [H_kv, S, D]
    if num_kept == 0 or num_kept == n:
        return kept_k, kept_v
    evicted = evicted_positions(kept, n)
    match = _launch_match(caches, row, kept_k, evicted)
    sorted_pos, starts, counts = _segments(match, evicted, num_kept)
    weighted = mode == "weighted"
    if weighted:
        scores = scores.float()
        if scores.stride(1) != 1:
            scores = scores.contiguous()
    out_k = torch.empty_like(kept_k)
    out_v = torch.empty_like(kept_v)
    dispatch.launchable(_accumulate_kernel, device)[(num_kept, h_kv)](
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


def _core_merge(cache, layout: PagedKVLayout, row, n: int, kept, scores):
    """``paged_merge`` of one layer by the core (``merging.merge_into_kept``) on gathered K, V."""
    keys, values = gather_kv_reference(cache, layout, row, n)
    kept = kept.long()
    if kept.shape[1] in (0, n):
        heads = torch.arange(kept.shape[0], device=kept.device)[:, None]
        return keys[heads, kept], values[heads, kept]
    evicted, match = _core_match(cache, layout, row, n, kept)
    return merge_into_kept(keys, values, kept, evicted, match, scores)


# ---------------------------------------------------------------------- public ops
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
    if resolve_backend(backend, caches.device) == "torch":  # the core's own merge
        return per_layer(
            caches,
            lambda c, k, s: _core_merge(c, layout, row, n, k, s if mode == "weighted" else None),
            kept,
            scores if scores is not None else [None] * caches.num_layers,
        )
    return _launch(caches, row, n, kept, mode, scores)
