"""Modality masks from placeholder ranges and MEDA's entropy row sample."""

from __future__ import annotations

import math

import pytest
import torch

from meda_vllm.modality import entropy_query_positions, modality_mask, visual_sample_stride


def test_mask_from_ranges():
    mask = modality_mask(20, [(2, 3), (10, 4)])
    assert mask.tolist() == [i in (2, 3, 4, 10, 11, 12, 13) for i in range(20)]
    assert mask.dtype == torch.bool


def test_mask_with_is_embed():
    embed = torch.tensor([False, True, True, False])
    mask = modality_mask(10, [(3, 4)], [embed])
    assert mask.nonzero().flatten().tolist() == [4, 5]
    mask = modality_mask(10, [(0, 2), (3, 4)], [None, embed])
    assert mask.nonzero().flatten().tolist() == [0, 1, 4, 5]


def test_mask_rejects_bad_ranges():
    with pytest.raises(ValueError, match="outside"):
        modality_mask(10, [(8, 4)])
    with pytest.raises(ValueError, match="entries"):
        modality_mask(10, [(0, 4)], [torch.ones(3, dtype=torch.bool)])
    with pytest.raises(ValueError, match="ranges"):
        modality_mask(10, [(0, 4)], [])


def test_no_ranges_is_text_only():
    assert not modality_mask(5, []).any()


@pytest.mark.parametrize("stride", [1, 3, 8])
def test_entropy_rows(stride):
    n, window = 100, 16
    vis = torch.zeros(n, dtype=torch.bool)
    vis[10:80] = True
    vis[90:92] = True  # an image token inside the window
    pos = entropy_query_positions(n, vis, window, stride)
    assert torch.equal(pos, torch.unique(pos))  # ascending, unique
    text_in_window = [p for p in range(n - window, n) if not vis[p]]
    assert set(text_in_window) <= set(pos.tolist())
    visual = [p for p in pos.tolist() if vis[p]]
    all_visual = vis.nonzero().flatten().tolist()
    # every stride-th visual row, and nothing else visual
    assert visual == all_visual[(stride - 1) // 2 :: stride]
    text_outside = [p for p in pos.tolist() if not vis[p] and p < n - window]
    assert text_outside == []


@pytest.mark.parametrize(("n_visual", "cap"), [(100, 64), (2048, 256), (2049, 256), (31000, 256)])
def test_entropy_rows_capped(n_visual, cap):
    n, window, stride = n_visual + 40, 16, 8
    vis = torch.zeros(n, dtype=torch.bool)
    vis[20 : 20 + n_visual] = True
    pos = entropy_query_positions(n, vis, window, stride, cap)
    visual = [p for p in pos.tolist() if vis[p]]
    all_visual = vis.nonzero().flatten().tolist()
    step = visual_sample_stride(n_visual, stride, cap)
    assert step == max(stride, math.ceil(n_visual / cap))
    assert visual == all_visual[(step - 1) // 2 :: step]  # spread over every visual row
    assert len(visual) <= cap
    assert all_visual[-1] - visual[-1] < step
    uncapped = entropy_query_positions(n, vis, window, stride)
    if n_visual <= stride * cap:  # the cap binds only past stride * cap visual rows
        assert torch.equal(pos, uncapped)
    else:
        assert len(visual) < int(vis[uncapped].sum())
    # text rows are the same whatever the cap
    assert [p for p in pos.tolist() if not vis[p]] == [p for p in uncapped.tolist() if not vis[p]]


def test_entropy_rows_without_text_in_window():
    n = 50
    vis = torch.zeros(n, dtype=torch.bool)
    vis[20:] = True
    pos = entropy_query_positions(n, vis, 8, 4)
    text = [p for p in pos.tolist() if not vis[p]]
    assert text == list(range(12, 20))  # the last window-many text rows stand in


def test_entropy_rows_text_only():
    assert entropy_query_positions(10, None, 4, 8).tolist() == [6, 7, 8, 9]
