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
import torch.nn.functional as F
from torch import Tensor

_MAX_ELEMS = 1 << 24
_WEIGHT_FLOOR = 1e-6


def nearest_kept(keys: Tensor, kept: Tensor, evicted: Tensor) -> Tensor:
    """``[H_kv, E]``: for each evicted position, the index (into ``kept``) of the most
    cosine-similar kept key of the same head."""
    h_kv = keys.shape[0]
    e = evicted.shape[1]
    s = kept.shape[1]
    out = torch.empty(h_kv, e, dtype=torch.long, device=keys.device)
    if e == 0:
        return out
    chunk = max(1, _MAX_ELEMS // max(1, s))
    for h in range(h_kv):
        k_kept = F.normalize(keys[h, kept[h]].float(), dim=-1)  # [S, D]
        for start in range(0, e, chunk):
            stop = min(e, start + chunk)
            k_ev = F.normalize(keys[h, evicted[h, start:stop]].float(), dim=-1)
            out[h, start:stop] = torch.matmul(k_ev, k_kept.t()).argmax(dim=-1)
    return out


def merge_weights(weights: Tensor) -> Tensor:
    """Per-entry weights of ``weighted`` merging: fp32 scores clamped at 0, plus a floor
    so that zero-score entries still count (the paged kernel gets these same weights)."""
    return weights.float().clamp_min(0) + _WEIGHT_FLOOR


def evicted_positions(kept: Tensor, n: int) -> Tensor:
    """``[H_kv, N - S]`` ascending positions not in ``kept``."""
    h_kv = kept.shape[0]
    mask = torch.ones(h_kv, n, dtype=torch.bool, device=kept.device)
    mask.scatter_(1, kept, False)
    return mask.nonzero()[:, 1].view(h_kv, n - kept.shape[1])


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
    h_kv, n, d = keys.shape
    s = kept.shape[1]
    if s >= n:
        return None, None
    evicted = evicted_positions(kept, n)
    target = nearest_kept(keys, kept, evicted)  # [H_kv, E]
    if mode == "weighted":
        if weights is None:
            raise ValueError("weighted merging needs attention scores")
        w = merge_weights(weights)
        w_kept, w_ev = w.gather(1, kept), w.gather(1, evicted)
    else:
        w_kept = torch.ones(h_kv, s, device=keys.device)
        w_ev = torch.ones(h_kv, evicted.shape[1], device=keys.device)
    out = []
    for tensor in (keys, values):
        acc = tensor.float().gather(1, kept[..., None].expand(h_kv, s, d)) * w_kept[..., None]
        ev = tensor.float().gather(1, evicted[..., None].expand(-1, -1, d)) * w_ev[..., None]
        acc.scatter_add_(1, target[..., None].expand(-1, -1, d), ev)
        norm = w_kept.clone().scatter_add_(1, target, w_ev)
        out.append((acc / norm[..., None]).to(tensor.dtype))
    return out[0], out[1]
