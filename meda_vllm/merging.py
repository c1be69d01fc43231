"""Merging evicted KV entries into kept ones (MEDA, LOOK-M).

Each evicted key is matched to its most cosine-similar kept key of the same KV head (ties:
the earliest kept position). ``average``: a kept entry becomes the plain mean of itself and
the evicted entries matched to it. ``weighted``: the mean weighted by each entry's
attention score (window column sum), plus a small floor so that zero-score entries still
count. The similarity matrix is ``evicted x kept``, chunked over evicted rows: compute
``O(N^2 D)`` at worst, memory bounded.
"""

from __future__ import annotations

import torch
from torch import Tensor

_MAX_ELEMS = 1 << 24
_WEIGHT_FLOOR = 1e-6


#: floor of a kept key's norm in the similarity (as the paged match kernel)
NORM_EPS = 1e-8


def nearest_kept(keys: Tensor, kept: Tensor, evicted: Tensor) -> Tensor:
    """``[H_kv, E]``: for each evicted position, the index (into ``kept``) of the most
    cosine-similar kept key of the same head (first maximum on ties).

    ``|k_e|`` does not change the argmax, so the similarity is ``(k_e . k_j) / max(|k_j|,
    1e-8)`` in fp32, the formula of the paged match kernel (``kernels/match.py``)."""
    h_kv = keys.shape[0]
    e = evicted.shape[1]
    s = kept.shape[1]
    out = torch.empty(h_kv, e, dtype=torch.long, device=keys.device)
    if e == 0:
        return out
    chunk = max(1, _MAX_ELEMS // max(1, s))
    for h in range(h_kv):
        k_kept = keys[h, kept[h]].float()  # [S, D]
        inv_norm = 1.0 / k_kept.pow(2).sum(-1).sqrt().clamp(min=NORM_EPS)
        for start in range(0, e, chunk):
            stop = min(e, start + chunk)
            k_ev = keys[h, evicted[h, start:stop]].float()
            out[h, start:stop] = (torch.matmul(k_ev, k_kept.t()) * inv_norm).argmax(dim=-1)
    return out


def merge_weights(weights: Tensor) -> Tensor:
    """Per-entry weights of ``weighted`` merging: fp32 scores clamped at 0, plus a floor
    so that zero-score entries still count (the paged kernel gets these same weights)."""
    return weights.float().clamp_min(0) + _WEIGHT_FLOOR


def evicted_positions(kept: Tensor, n: int) -> Tensor:
    """``[H_kv, N - S]`` ascending positions not in ``kept`` (no host synchronisation)."""
    h_kv, num_kept = kept.shape
    is_kept = torch.zeros((h_kv, n), dtype=torch.int8, device=kept.device)
    is_kept.scatter_(1, kept.long(), 1)
    return torch.argsort(is_kept, dim=1, stable=True)[:, : n - num_kept]


def merge_into_kept(
    keys: Tensor,
    values: Tensor,
    kept: Tensor,
    evicted: Tensor,
    target: Tensor,
    weights: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """Merged ``[H_kv, S, D]`` keys and values of the ``kept`` slots, in the input dtype:
    ``x_new[j] = (w_j x_j + sum_{e -> j} w_e x_e) / (w_j + sum_{e -> j} w_e)``, accumulated in
    fp32, with ``w = 1`` without ``weights [H_kv, N]`` (non-negative; a group whose weights
    are all 0 is averaged). ``target [H_kv, E]``: the kept index each ``evicted`` position
    merges into. A kept entry that nothing merges into is returned as it is. Also the
    torch path of the paged kernel (``kernels.paged_merge``)."""
    h_kv, num_kept = kept.shape
    d = keys.shape[-1]
    device = keys.device
    heads = torch.arange(h_kv, device=device)[:, None]
    flat = (target + heads * num_kept).flatten()
    counts = torch.zeros(h_kv * num_kept, device=device)
    counts.index_add_(0, flat, torch.ones_like(flat, dtype=torch.float32))
    counts = counts.view(h_kv, num_kept, 1)
    if weights is not None:
        w = weights.float()
        w_kept = w.gather(1, kept.long())[..., None]
        w_ev = w.gather(1, evicted.long())
        w_total = torch.zeros(h_kv * num_kept, device=device)
        w_total.index_add_(0, flat, w_ev.flatten())
        den = w_kept + w_total.view(h_kv, num_kept, 1)
    out = []
    for tensor in (keys, values):
        x = tensor[heads, kept.long()].float()  # [H_kv, S, D]
        e = tensor[heads, evicted.long()].float()  # [H_kv, E, D]
        summed = torch.zeros(h_kv * num_kept, d, device=device)
        summed.index_add_(0, flat, e.reshape(-1, d))
        new = (x + summed.view(h_kv, num_kept, d)) / (1.0 + counts)
        if weights is not None:
            w_sum = torch.zeros(h_kv * num_kept, d, device=device)
            w_sum.index_add_(0, flat, (e * w_ev[..., None]).reshape(-1, d))
            weighted = (w_kept * x + w_sum.view(h_kv, num_kept, d)) / den.clamp(min=1e-30)
            new = torch.where(den > 0, weighted, new)
        out.append(torch.where(counts > 0, new, x).to(tensor.dtype))
    return out[0], out[1]


def merge_evicted(
    keys: Tensor,
    values: Tensor,
    kept: Tensor,
    mode: str,
    weights: Tensor | None = None,
) -> tuple[Tensor | None, Tensor | None]:
    """Merged ``[H_kv, S, D]`` keys and values for the ``kept`` slots, or ``(None, None)``.

    ``weights``: ``[H_kv, N]`` attention scores, required for ``mode="weighted"``.
    """
    if mode == "none":
        return None, None
    if mode not in ("average", "weighted"):
        raise ValueError(f"merge must be one of none, average, weighted (got {mode!r})")
    n = keys.shape[1]
    if kept.shape[1] >= n:
        return None, None
    if mode == "weighted" and weights is None:
        raise ValueError("weighted merging needs attention scores")
    evicted = evicted_positions(kept, n)
    target = nearest_kept(keys, kept, evicted)  # [H_kv, E]
    w = merge_weights(weights) if mode == "weighted" else None
    return merge_into_kept(keys, values, kept, evicted, target, w)
