"""Modality masks from placeholder ranges, and the query rows MEDA's entropy samples."""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import torch
from torch import Tensor


def modality_mask(
    n: int,
    ranges: Iterable[tuple[int, int]],
    is_embed: Sequence[Tensor | None] | None = None,
) -> Tensor:
    """``[n]`` bool, True on image/video tokens.

    ``ranges``: ``(offset, length)`` placeholder ranges (vLLM's ``PlaceholderRange``).
    ``is_embed``: optional per-range bool masks of length ``length``; where given, only
    the True entries are media tokens (e.g. vision start/end markers inside the range
    are text).
    """
    mask = torch.zeros(n, dtype=torch.bool)
    ranges = list(ranges)
    if is_embed is not None and len(is_embed) != len(ranges):
        raise ValueError(f"is_embed has {len(is_embed)} entries for {len(ranges)} ranges")
    for i, (offset, length) in enumerate(ranges):
        if offset < 0 or length < 0 or offset + length > n:
            raise ValueError(f"placeholder range ({offset}, {length}) is outside [0, {n})")
        embed = None if is_embed is None else is_embed[i]
        if embed is None:
            mask[offset : offset + length] = True
            continue
        embed = torch.as_tensor(embed, dtype=torch.bool).flatten().cpu()
        if embed.numel() != length:
            raise ValueError(f"is_embed for range ({offset}, {length}) has {embed.numel()} entries")
        mask[offset : offset + length] |= embed
    return mask


def visual_sample_stride(n_visual: int, visual_stride: int, max_visual_rows: int = 0) -> int:
    """The stride of :func:`entropy_query_positions`' visual rows: ``visual_stride``, or
    larger so that at most ``max_visual_rows`` rows are taken (0: no cap)."""
    if max_visual_rows > 0:
        return max(visual_stride, -(-n_visual // max_visual_rows))
    return visual_stride


def entropy_query_positions(
    n: int, vis: Tensor | None, window: int, visual_stride: int, max_visual_rows: int = 0
) -> Tensor:
    """Ascending prompt positions whose query rows MEDA's sampled entropy reads.

    All text rows in the observation window (the last ``min(window, n)`` positions) plus
    every ``s``-th visual row, counted from the middle of the first stride so that the
    sample is not biased to the first patch of each image. If the window holds no text
    row, the last ``min(window, n_text)`` text rows stand in for it.

    ``s = visual_stride``, raised to ``ceil(n_visual / max_visual_rows)`` when that is
    larger (``max_visual_rows > 0``), so at most ``max_visual_rows`` visual rows are read.
    A fixed stride alone makes the sample grow with ``N`` and the entropy pass cost
    ``O(N^2 / s)``; the cap keeps it linear in ``N`` (and bounds the query rows captured
    per layer). See docs/ALGORITHM_CHOICES.md.
    """
    if vis is None or n == 0:
        return torch.arange(max(0, n - window), n, dtype=torch.long)
    vis = vis.cpu()
    positions = torch.arange(n)
    in_window = positions >= n - window
    text_rows = positions[~vis & in_window]
    if text_rows.numel() == 0:
        text_rows = positions[~vis][-window:]
    visual = positions[vis]
    stride = visual_sample_stride(visual.numel(), visual_stride, max_visual_rows)
    vis_rows = visual[(stride - 1) // 2 :: stride]
    return torch.unique(torch.cat([text_rows, vis_rows])).long()
