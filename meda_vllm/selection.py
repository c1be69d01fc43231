"""Observation-window scores, pooling and deterministic ranking of positions.

Nothing here builds an ``N x N`` matrix: the scores are ``rows x N`` with the rows chunked
so that at most ``_MAX_ELEMS`` logits exist at once.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from meda_vllm.types import LayerView

_MAX_ELEMS = 1 << 24  # logits alive at once (64 MiB of fp32)


def rows_for_positions(query_pos: Tensor, positions: Tensor) -> Tensor:
    """Indices into the captured rows for ``positions``; ValueError if any was not captured."""
    positions = positions.to(device=query_pos.device, dtype=query_pos.dtype)
    if positions.numel() == 0:
        return positions.long()
    idx = torch.searchsorted(query_pos, positions).clamp_(max=max(query_pos.numel() - 1, 0))
    if query_pos.numel() == 0 or not bool((query_pos[idx] == positions).all()):
        have = set(query_pos.tolist())
        missing = [p for p in positions.tolist() if p not in have]
        raise ValueError(
            f"query rows for prompt positions {missing[:8]}{'...' if len(missing) > 8 else ''} "
            "were not captured (see compress.required_query_positions)"
        )
    return idx


def last_rows(query_pos: Tensor, n: int, count: int) -> Tensor:
    """Indices into the captured rows of the last ``min(count, n)`` prompt positions."""
    count = min(count, n)
    wanted = torch.arange(n - count, n, device=query_pos.device)
    return rows_for_positions(query_pos, wanted)


def attention_column_sums(queries: Tensor, query_pos: Tensor, keys: Tensor, scale: float) -> Tensor:
    """``[H_kv, N]`` fp32: sum over the given rows of the causal softmax, mean over the group.

    ``queries``: ``[H, R, D]`` at prompt positions ``query_pos`` (``[R]``); a row at
    position ``p`` sees keys ``0..p``. Query head ``h`` reads KV head ``h // group``.
    """
    h, r, _ = queries.shape
    h_kv, n, _ = keys.shape
    group = h // h_kv
    out = torch.zeros(h_kv, n, dtype=torch.float32, device=keys.device)
    if r == 0 or n == 0:
        return out
    cols = torch.arange(n, device=keys.device)
    rows_per_chunk = max(1, _MAX_ELEMS // (group * n))
    for kv in range(h_kv):
        k = keys[kv].float()  # [N, D]
        q_group = queries[kv * group : (kv + 1) * group]  # [g, R, D]
        for start in range(0, r, rows_per_chunk):
            stop = min(r, start + rows_per_chunk)
            q = q_group[:, start:stop].float()  # [g, c, D]
            logits = torch.matmul(q, k.t()) * scale  # [g, c, N]
            future = cols[None, :] > query_pos[start:stop, None]  # [c, N]
            logits.masked_fill_(future, float("-inf"))
            out[kv] += torch.softmax(logits, dim=-1).sum(dim=(0, 1))
    return out / group


def window_scores(view: LayerView, n_rows: int) -> Tensor:
    """Column sums over the last ``n_rows`` prompt queries (the engine's override if given)."""
    if view.window_scores is not None:
        return view.window_scores.float()
    idx = last_rows(view.query_pos, view.N, n_rows)
    return attention_column_sums(
        view.queries[:, idx], view.query_pos[idx], view.keys, view.softmax_scale
    )


def pool_scores(scores: Tensor, mode: str, kernel: int) -> Tensor:
    """1-D max/avg pooling over positions (stride 1, same length); ``none`` is the identity."""
    if mode == "none" or kernel <= 1:
        return scores
    pad = kernel // 2
    x = scores.unsqueeze(1)
    if mode == "max":
        return F.max_pool1d(x, kernel, stride=1, padding=pad).squeeze(1)
    if mode == "avg":
        return F.avg_pool1d(x, kernel, stride=1, padding=pad).squeeze(1)
    raise ValueError(f"pooling must be one of max, avg, none (got {mode!r})")


def _stable_desc(order: Tensor, key: Tensor) -> Tensor:
    vals = key.gather(1, order)
    return order.gather(1, torch.sort(vals, dim=1, descending=True, stable=True).indices)


def rank_positions(
    score: Tensor, *, tiebreak: Tensor | None = None, tier: Tensor | None = None
) -> Tensor:
    """``[H_kv, N]`` positions best first, deterministic.

    Order: higher ``tier`` first (forced-keep sets), then higher ``score``, then higher
    ``tiebreak`` (the raw score, so a peak beats the neighbours that pooling tied with it),
    then the later position (recency). ``tier``: small non-negative ints (< 256).
    """
    h_kv, n = score.shape
    device = score.device
    order = torch.arange(n - 1, -1, -1, device=device).expand(h_kv, n).contiguous()
    if tiebreak is not None and tiebreak is not score:  # unpooled: the same key, skip a sort
        order = _stable_desc(order, torch.nan_to_num(tiebreak.float(), nan=float("-inf")))
    order = _stable_desc(order, torch.nan_to_num(score.float(), nan=float("-inf")))
    if tier is not None:  # 8-bit keys: one radix pass on a GPU instead of eight for int64
        order = _stable_desc(order, tier.to(torch.uint8).expand(h_kv, n))
    return order


def take_best(order: Tensor, k: int) -> Tensor:
    """The first ``k`` ranked positions, ascending (int64)."""
    # int32 keys: half the radix passes of an int64 sort on a GPU (positions < 2^31)
    return torch.sort(order[:, :k].to(torch.int32), dim=1).values.to(torch.int64)


def topk_with_forced(score: Tensor, k: int, forced: Tensor | None = None) -> Tensor:
    """``[H_kv, k]`` ascending: the ``forced`` positions (``[N]`` or ``[H_kv, N]`` bool) first,
    then the best by ``score``."""
    tier = None if forced is None else forced.to(torch.int64)
    return take_best(rank_positions(score, tier=tier), k)


def host_values(values: list[int], device: torch.device | str) -> Tensor:
    """A small int64 tensor of host values on ``device``; on a GPU through pinned memory,
    so the copy is queued on the stream instead of waiting for the GPU to drain."""
    t = torch.tensor(values, dtype=torch.int64)
    if torch.device(device).type == "cuda":
        return t.pin_memory().to(device, non_blocking=True)
    return t.to(device)


def tier_rows(n: int, specs, vis: Tensor | None, device: torch.device | str) -> Tensor:
    """``[L, n]`` int64 forced-keep tiers of ``L`` layers from their ``TierSpec``s (counts):
    2 for the last ``recent`` positions, else 1 for the first ``first`` positions and (with
    ``text_first``) the text positions (``~vis``), else 0. Without a tier-1 set the recent
    positions are 1. A few elementwise ops for all layers together, no host sync."""
    pos = torch.arange(n, device=device)
    text_first = {s.text_first for s in specs}
    if len(text_first) != 1:
        raise ValueError("the layers of a set must agree on text_first")
    text = ~vis.to(device) if text_first.pop() and vis is not None else None
    has_first = any(s.first > 0 for s in specs)
    if len(specs) == 1:
        recent = (pos >= n - specs[0].recent)[None, :]
        first = (pos < specs[0].first)[None, :] if has_first else None
    else:
        recent = pos[None, :] >= n - host_values([s.recent for s in specs], device)[:, None]
        first = pos[None, :] < host_values([s.first for s in specs], device)[:, None]
        first = first if has_first else None
    second = first if text is None else (text[None, :] if first is None else first | text)
    if second is None:
        return recent.to(torch.int64)
    return torch.where(recent, 2, second.to(torch.int64))


def recent_mask(n: int, count: int, device: torch.device | str | None = None) -> Tensor:
    """``[n]`` bool, True for the last ``min(count, n)`` positions."""
    mask = torch.zeros(n, dtype=torch.bool, device=device)
    if count > 0:
        mask[max(0, n - count) :] = True
    return mask
