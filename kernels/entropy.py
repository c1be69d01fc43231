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

Kernels: split-K partial (m, Z', T') per (KV head, key chunk, row) in base 2
(``split_stats.py``: one program per (row block, key chunk, KV head), the row blocks
neighbours in the grid; :func:`paged_scores_and_entropy` runs the window scores' first
pass in the same launch), then one small program per layer folds the chunks, the rows
and the heads. Traffic: K read once from DRAM (``n*H_kv*D`` elements; the row blocks of a
chunk share it in L2) plus ``n`` mask bytes.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import triton
import triton.language as tl

from meda_vllm.entropy import cross_modal_entropy_terms

from . import dispatch
from .dispatch import resolve_backend
from .gather import gather_pages_reference
from .layout import LayerSet, PagedKVLayout, check_caches, check_queries, check_row
from .split_stats import SplitStats, split_stats
from .window_scores import finish_scores, paged_window_scores


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
    stats_rows,
    row_offset,
    num_splits,
    BLOCK_R: tl.constexpr,
):
    # the entropy rows are group_rows of every stats_rows-long partial row, from row_offset
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
                at = (kv_head * num_splits + split).to(tl.int64) * stats_rows + row_offset + rr
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


def _launch(q, q_pos, caches: LayerSet, row, n, vis, scale, causal, group):
    """``[L, 2]`` per layer of the set."""
    if n == 0 or q.shape[1] == 0:  # no row or no key: NaN in both directions
        shape = (caches.num_layers, 2)
        return torch.full(shape, float("nan"), dtype=torch.float32, device=caches.device)
    stats = split_stats(q, q_pos, caches, row, n, scale, group, 0, vis, causal)
    return finish_entropy(q_pos, caches, vis, stats)


def finish_entropy(q_pos, caches: LayerSet, vis, stats: SplitStats) -> torch.Tensor:
    """Fold the entropy rows' partials (``q_pos``: their positions; they follow the
    window rows in ``stats``) into ``[L, 2]``: one program per layer."""
    device = caches.device
    out = torch.empty((caches.num_layers, 2), dtype=torch.float32, device=device)  # all written
    rows = q_pos.shape[0]
    group_rows = stats.group * rows
    dispatch.launchable(_entropy_combine_kernel, device)[(caches.num_layers,)](
        stats.m,
        stats.z,
        stats.t,
        q_pos,
        vis.view(torch.uint8),  # a bool mask (checked by the public ops)
        out,
        caches.layout.num_kv_heads,
        rows,
        group_rows,
        stats.stats_rows,
        stats.group * stats.window_rows,
        stats.splits,
        BLOCK_R=min(1024, triton.next_power_of_2(group_rows)),
    )
    return out


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
    in one pass (see ``LayerSet``).
    """
    caches, group, scale = _checked(q, q_pos, cache, layout, row, n, vis, scale)
    if resolve_backend(backend, caches.device) == "torch":  # the core's own estimate
        pos = q_pos.long()
        out = torch.stack([
            cross_modal_entropy_terms(
                ql, pos, gather_pages_reference(layout.k_view(c), layout, row, n), vis,
                scale=scale, causal=causal,
            ).float()
            for c, ql in zip(caches.tensors, q.chunk(caches.num_layers, dim=0), strict=True)
        ])  # fmt: skip
    else:
        out = _launch(q, q_pos, caches, row, n, vis, scale, causal, group)
    return out if caches.is_layer_set else out[0]


def _checked(q, q_pos, cache, layout, row, n: int, vis, scale) -> tuple[LayerSet, int, float]:
    """Validate the arguments both public ops share; ``(caches, GQA group, scale)``."""
    caches = check_caches(cache, layout)
    check_row(row, caches.base, layout, n)
    group = check_queries(q, q_pos, caches, n)
    if not isinstance(vis, torch.Tensor) or vis.dim() != 1 or vis.dtype != torch.bool:
        raise ValueError("vis must be a 1-D bool tensor (True = visual position)")
    if vis.shape[0] != n:
        raise ValueError(f"vis has {vis.shape[0]} entries, expected n = {n}")
    if vis.device != caches.device:
        raise ValueError(f"vis is on {vis.device} but cache is on {caches.device}")
    scale = 1.0 / math.sqrt(layout.head_size) if scale is None else float(scale)
    return caches, group, scale


def paged_scores_and_entropy(
    q: torch.Tensor,
    q_pos: torch.Tensor,
    window_rows: int,
    cache: torch.Tensor | Sequence[torch.Tensor],
    layout: PagedKVLayout,
    row: torch.Tensor,
    n: int,
    vis: torch.Tensor,
    scale: float | None = None,
    causal: bool = False,
    *,
    backend: str | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`~.window_scores.paged_window_scores` and :func:`paged_cross_modal_entropy`
    with one read of K (MEDA needs both): their first passes share one launch.

    Rows ``[0, window_rows)`` of ``q [H, R, D]`` / ``q_pos [R]`` are the window's, the
    others the entropy sample. Returns what the two ops return for those rows:
    ``(scores [H_kv, n], entropy [2])``, or ``[L * H_kv, n]`` and ``[L, 2]`` for a layer set.
    """
    caches, group, scale = _checked(q, q_pos, cache, layout, row, n, vis, scale)
    if isinstance(window_rows, bool) or not isinstance(window_rows, int):
        raise ValueError(f"window_rows must be an int, got {window_rows!r}")
    if not 0 <= window_rows <= q.shape[1]:
        raise ValueError(f"window_rows = {window_rows} outside [0, {q.shape[1]}] (rows of q)")
    q_win, pos_win = q[:, :window_rows], q_pos[:window_rows]
    q_ent, pos_ent = q[:, window_rows:], q_pos[window_rows:]
    fused = (
        resolve_backend(backend, caches.device) == "triton"
        and n > 0
        and 0 < window_rows < q.shape[1]
    )
    if not fused:  # the reference, or one of the sets is empty: the two ops as they are
        paged = (cache, layout, row, n)
        return (
            paged_window_scores(q_win, pos_win, *paged, scale, backend=backend),
            paged_cross_modal_entropy(q_ent, pos_ent, *paged, vis, scale, causal, backend=backend),
        )
    stats = split_stats(q, q_pos, caches, row, n, scale, group, window_rows, vis, causal)
    scores = finish_scores(q_win, pos_win, caches, row, n, scale, stats)
    entropy = finish_entropy(pos_ent, caches, vis, stats)
    return scores, entropy if caches.is_layer_set else entropy[0]
