"""MEDA's cross-modal attention entropy of one layer.

``E = -(mean_rows sum_cols A_TV log A_TV + mean_rows sum_cols A_VT log A_VT)``, averaged
over query heads, where ``A_TV`` is text queries over visual keys and ``A_VT`` visual
queries over text keys, each softmax-normalised on its own slice. No causal mask by
default (as the paper and its code); with ``causal=True`` a row only sees keys at or
before its position, and rows that see no key of the other modality are skipped.

``cross_modal_entropy`` reads only the rows it is given (in serving: the sampled rows of
``modality.entropy_query_positions``), so its cost is
``O((R_T * N_V + R_V * N_T) * D)`` per head and nothing ``N x N`` is built.
``cross_modal_entropy_exact`` is the brute-force reference over every row (tests only).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from meda_vllm.modality import entropy_query_positions
from meda_vllm.selection import rows_for_positions
from meda_vllm.types import LayerView

_MAX_ELEMS = 1 << 24


def _mean_row_entropy(
    q: Tensor, q_pos: Tensor, k: Tensor, k_pos: Tensor, scale: float, causal: bool
) -> Tensor:
    """``[g]`` mean over rows of the row entropy of ``softmax(q k^T)``; NaN if no row counts.

    ``q``: ``[g, R, D]`` (one KV group), ``k``: ``[M, D]``.
    """
    g, r, _ = q.shape
    m = k.shape[0]
    total = torch.zeros(g, dtype=torch.float64, device=k.device)
    rows = torch.zeros((), dtype=torch.float64, device=k.device)
    if r == 0 or m == 0:
        return torch.full((g,), float("nan"), dtype=torch.float64, device=k.device)
    kf = k.float()
    chunk = max(1, _MAX_ELEMS // (g * m))
    for start in range(0, r, chunk):
        stop = min(r, start + chunk)
        logits = torch.matmul(q[:, start:stop].float(), kf.t()) * scale  # [g, c, M]
        if causal:
            hidden = k_pos[None, :] > q_pos[start:stop, None]  # [c, M]
            valid = ~hidden.all(dim=1)  # rows that see at least one key
            logits = logits.masked_fill(hidden, float("-inf"))
        else:
            valid = torch.ones(stop - start, dtype=torch.bool, device=k.device)
        if not bool(valid.any()):
            continue
        logits = logits[:, valid]
        logp = torch.log_softmax(logits, dim=-1)
        p = logp.exp()
        # H = -sum p log p, with 0 log 0 = 0 on masked keys.
        ent = -(p * torch.where(p > 0, logp, torch.zeros_like(logp))).sum(-1)  # [g, c']
        total += ent.double().sum(-1)
        rows += int(valid.sum())
    if float(rows) == 0:
        return torch.full((g,), float("nan"), dtype=torch.float64, device=k.device)
    return total / rows


def cross_modal_entropy_terms(
    queries: Tensor,
    query_pos: Tensor,
    keys: Tensor,
    vis: Tensor,
    *,
    scale: float | None = None,
    causal: bool = False,
) -> Tensor:
    """``[2]`` float64: the text->visual and visual->text mean row entropies, each averaged
    over query heads, from the given query rows (``[H, R, D]`` at ``query_pos``); a term is
    NaN when it has no row or no key (text-only or vision-only input).

    Rows at text positions feed ``A_TV``, rows at visual positions feed ``A_VT``. Also the
    torch path of the paged kernel (``kernels.paged_cross_modal_entropy``).
    """
    h = queries.shape[0]
    h_kv, n, d = keys.shape
    group = h // h_kv
    scale = scale if scale is not None else 1.0 / math.sqrt(d)
    vis = vis.to(keys.device)
    positions = torch.arange(n, device=keys.device)
    row_vis = vis[query_pos]
    t_rows, v_rows = (~row_vis).nonzero().squeeze(1), row_vis.nonzero().squeeze(1)
    v_keys, t_keys = positions[vis], positions[~vis]
    how = (scale, causal)
    e_tv, e_vt = [], []
    for kv in range(h_kv):
        q = queries[kv * group : (kv + 1) * group]
        k = keys[kv]
        e_tv.append(_mean_row_entropy(q[:, t_rows], query_pos[t_rows], k[v_keys], v_keys, *how))
        e_vt.append(_mean_row_entropy(q[:, v_rows], query_pos[v_rows], k[t_keys], t_keys, *how))
    return torch.stack([torch.cat(e_tv).mean(), torch.cat(e_vt).mean()])


def cross_modal_entropy(
    queries: Tensor,
    query_pos: Tensor,
    keys: Tensor,
    vis: Tensor,
    *,
    scale: float | None = None,
    causal: bool = False,
) -> float:
    """Cross-modal entropy from the given query rows: the sum of
    :func:`cross_modal_entropy_terms` (NaN if either term is)."""
    return float(
        cross_modal_entropy_terms(queries, query_pos, keys, vis, scale=scale, causal=causal).sum()
    )


def cross_modal_entropy_exact(
    queries_all: Tensor,
    keys: Tensor,
    vis: Tensor,
    *,
    scale: float | None = None,
    causal: bool = False,
) -> float:
    """Brute-force reference: every row, the full ``N x N`` logits (tests only).

    ``queries_all``: ``[H, N, D]``, one row per prompt position.
    """
    h, n, d = queries_all.shape
    h_kv = keys.shape[0]
    group = h // h_kv
    scale = scale if scale is not None else 1.0 / math.sqrt(d)
    k = keys.double().repeat_interleave(group, dim=0)  # [H, N, D]
    logits = torch.einsum("hid,hjd->hij", queries_all.double(), k) * scale
    if causal:
        future = torch.ones(n, n, dtype=torch.bool).triu(1)
        logits = logits.masked_fill(future, float("-inf"))
    vis = vis.cpu()
    total = torch.zeros(h, dtype=torch.float64)
    for rows_mask, cols_mask in ((~vis, vis), (vis, ~vis)):
        block = logits[:, rows_mask][:, :, cols_mask]  # [H, R, M]
        if block.shape[1] == 0 or block.shape[2] == 0:
            return float("nan")
        seen = torch.isfinite(block).any(-1)[0]  # rows with a visible key (same for all heads)
        if not bool(seen.any()):
            return float("nan")
        p = torch.softmax(block[:, seen], dim=-1)
        ent = -torch.where(p > 0, p * p.log(), torch.zeros_like(p)).sum(-1)
        total += ent.mean(-1)
    return float(total.mean())


def to_host_floats(values: list[float | Tensor]) -> list[float]:
    """Floats of ``values`` (floats and 0-d tensors), with one device-to-host copy for all
    the tensors instead of one synchronisation each."""
    tensors = [i for i, v in enumerate(values) if isinstance(v, Tensor)]
    out = list(values)
    if tensors:
        host = torch.stack([values[i].reshape(()) for i in tensors]).double().tolist()
        for i, v in zip(tensors, host, strict=True):
            out[i] = v
    return [float(v) for v in out]


def layer_entropy(
    view: LayerView, window: int, visual_stride: int, causal: bool, max_visual_rows: int = 0
) -> float:
    """The layer's entropy: the engine's override, else the sampled estimate."""
    return float(layer_entropy_value(view, window, visual_stride, causal, max_visual_rows))


def layer_entropy_value(
    view: LayerView, window: int, visual_stride: int, causal: bool, max_visual_rows: int = 0
) -> float | Tensor:
    """:func:`layer_entropy` without reading a device value: the engine's override as
    given (possibly a 0-d GPU tensor, see :func:`to_host_floats`), else the estimate."""
    if view.entropy is not None:
        return view.entropy
    if view.vis is None:
        return float("nan")
    positions = entropy_query_positions(view.N, view.vis, window, visual_stride, max_visual_rows)
    idx = rows_for_positions(view.query_pos, positions)
    return cross_modal_entropy(
        view.queries[:, idx],
        view.query_pos[idx],
        view.keys,
        view.vis,
        scale=view.softmax_scale,
        causal=causal,
    )
