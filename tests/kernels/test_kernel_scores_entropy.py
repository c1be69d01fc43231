"""paged_scores_and_entropy: MEDA's window scores and entropy from one statistics launch
must equal the two ops run on their own rows (and their torch references)."""

from __future__ import annotations

import pytest
import torch

from meda_vllm.kernels import (
    paged_cross_modal_entropy,
    paged_scores_and_entropy,
    paged_window_scores,
)
from meda_vllm.kernels.split_stats import _row_tiles
from meda_vllm.testing.launches import recording_launches
from meda_vllm.testing.synthetic import paged_request

TOL = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 2e-2}


def _rows(n, window, stride, seed=0):
    """Window positions (the last ``window``) then a sorted sample (entropy rows)."""
    gen = torch.Generator().manual_seed(seed)
    sample = torch.sort(torch.randperm(n, generator=gen)[: max(1, n // stride)]).values
    return torch.cat([torch.arange(n - window, n), sample])


def _case(layout, dtype, n, h_kv, group, layers, window, stride=5, head_size=32, bs=16):
    req = paged_request(n, layers, h_kv, head_size, bs, layout=layout, dtype=dtype, seed=layers)
    pos = _rows(n, window, stride)
    q = torch.cat(req.query_rows(h_kv * group, pos))  # [L * H, R, D]
    caches = req.caches if layers > 1 else req.caches[0]
    return req, caches, q, pos


def _separate(q, pos, window, caches, layout, req, causal, backend):
    paged = (caches, layout, req.row, req.n)
    scores = paged_window_scores(q[:, :window], pos[:window], *paged, backend=backend)
    ent = paged_cross_modal_entropy(
        q[:, window:], pos[window:], *paged, req.vis, causal=causal, backend=backend
    )
    return scores, ent


@pytest.mark.parametrize(
    "layout,dtype,h_kv,group,layers,window,causal",
    [
        ("nhd", torch.float32, 2, 1, 1, 8, False),
        ("nhd", torch.bfloat16, 2, 4, 3, 6, True),  # a layer set
        ("cpu_vec", torch.float16, 1, 7, 1, 5, False),
        ("cpu_vec", torch.float32, 2, 7, 2, 40, True),  # 7 x 40 window rows: 2 row blocks
    ],
)
def test_fused_equals_the_two_ops(layout, dtype, h_kv, group, layers, window, causal):
    req, caches, q, pos = _case(layout, dtype, 90, h_kv, group, layers, window)
    lay = req.layouts[0]
    scores, ent = paged_scores_and_entropy(
        q, pos, window, caches, lay, req.row, req.n, req.vis, causal=causal, backend="triton"
    )
    want_s, want_e = _separate(q, pos, window, caches, lay, req, causal, "triton")
    ref_s, ref_e = _separate(q, pos, window, caches, lay, req, causal, "torch")
    assert scores.shape == (layers * h_kv, req.n)
    assert ent.shape == ((layers, 2) if layers > 1 else (2,))
    torch.testing.assert_close(scores, want_s, rtol=1e-6, atol=1e-6)  # same arithmetic
    torch.testing.assert_close(ent, want_e, rtol=1e-6, atol=1e-6, equal_nan=True)
    tol = TOL[dtype] if dtype != torch.float32 else 1e-5
    torch.testing.assert_close(scores, ref_s, rtol=tol, atol=tol)
    torch.testing.assert_close(ent, ref_e, rtol=tol, atol=tol, equal_nan=True)
    # the torch backend of the fused op is the two references
    both = paged_scores_and_entropy(
        q, pos, window, caches, lay, req.row, req.n, req.vis, causal=causal, backend="torch"
    )
    torch.testing.assert_close(both[0], ref_s)
    torch.testing.assert_close(both[1], ref_e, equal_nan=True)


@pytest.mark.parametrize("head_size,block_size", [(64, 128), (80, 16), (128, 128)])
def test_fused_head_and_block_sizes(head_size, block_size):
    req, caches, q, pos = _case(
        "nhd", torch.bfloat16, 150, 2, 4, 1, 12, head_size=head_size, bs=block_size
    )
    lay = req.layouts[0]
    got = paged_scores_and_entropy(
        q, pos, 12, caches, lay, req.row, req.n, req.vis, causal=True, backend="triton"
    )
    want = _separate(q, pos, 12, caches, lay, req, True, "torch")
    torch.testing.assert_close(got[0], want[0], rtol=2e-2, atol=2e-2)
    torch.testing.assert_close(got[1], want[1], rtol=2e-2, atol=2e-2, equal_nan=True)


@pytest.mark.parametrize("window", [0, "all"])
def test_an_empty_set_is_the_other_op(window):
    req, caches, q, pos = _case("nhd", torch.float32, 60, 2, 2, 1, 8)
    window = q.shape[1] if window == "all" else window
    lay = req.layouts[0]
    scores, ent = paged_scores_and_entropy(
        q, pos, window, caches, lay, req.row, req.n, req.vis, backend="triton"
    )
    want_s, want_e = _separate(q, pos, window, caches, lay, req, False, "torch")
    torch.testing.assert_close(scores, want_s, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ent, want_e, rtol=1e-5, atol=1e-5, equal_nan=True)
    if window == 0:
        assert bool((scores == 0).all())
    else:
        assert bool(ent.isnan().all())


def test_text_only_rows_give_nan_like_the_op():
    req, caches, q, pos = _case("nhd", torch.float32, 50, 1, 2, 1, 4)
    no_vis = torch.zeros(req.n, dtype=torch.bool)
    lay = req.layouts[0]
    _, ent = paged_scores_and_entropy(
        q, pos, 4, caches, lay, req.row, req.n, no_vis, backend="triton"
    )
    assert bool(ent.isnan().all())


def test_validation():
    req, caches, q, pos = _case("nhd", torch.float32, 40, 1, 1, 1, 4)
    lay = req.layouts[0]
    args = (caches, lay, req.row, req.n, req.vis)
    for bad in (-1, q.shape[1] + 1, 2.0, True):
        with pytest.raises(ValueError, match="window_rows"):
            paged_scores_and_entropy(q, pos, bad, *args)
    with pytest.raises(ValueError, match="vis"):
        paged_scores_and_entropy(q, pos, 4, caches, lay, req.row, req.n, req.vis[:-1])


def test_one_statistics_launch_instead_of_two():
    """On a GPU (recorded, not run): fused = 4 launches (statistics, lse, scores, entropy
    fold), the two ops = 5, and K is streamed by one statistics kernel instead of two."""
    req, caches, q, pos = _case("nhd", torch.bfloat16, 300, 2, 4, 3, 8)
    lay = req.layouts[0]
    with recording_launches() as fused:
        paged_scores_and_entropy(q, pos, 8, caches, lay, req.row, req.n, req.vis, backend="triton")
    with recording_launches() as apart:
        _separate(q, pos, 8, caches, lay, req, False, "triton")
    names = [r.kernel.fn.__name__ for r in fused]
    assert len(fused) == 4 and len(apart) == 5, names
    assert names.count("_split_stats_kernel") == 1
    assert [r.kernel.fn.__name__ for r in apart].count("_split_stats_kernel") == 2


def test_row_tiles_pad_little():
    cpu = torch.device("cpu")
    with recording_launches():  # the GPU branch of the tile choice
        assert _row_tiles(32, 160, False, cpu)[0] == 32  # LLaVA MEDA: 192 rows, not 384
        assert _row_tiles(224, 1120, False, cpu)[0] == 128  # Qwen2-VL: within 10 %
        assert _row_tiles(224, 0, False, cpu)[0] == 128  # one set: dot_tiles' choice
        assert _row_tiles(32, 160, True, cpu)[0] == 16  # fp32 operands: dot_tiles' 16


@pytest.mark.gpu
@pytest.mark.parametrize("h_kv,group", [(32, 1), (4, 7)])  # LLaVA-1.5-7B, Qwen2-VL-7B
@pytest.mark.parametrize("n", [2048, 32768])
def test_fused_gpu_real_size(h_kv, group, n):
    """Real geometry, 28 layers in one set at 2K (one layer at 32K), MEDA's default sample
    (32 window rows + at most 128 visual rows): fused == the torch references."""
    from meda_vllm.modality import entropy_query_positions

    layers = 28 if n <= 2048 else 1
    req = paged_request(n, layers, h_kv, 128, 16, dtype=torch.bfloat16, device="cuda", seed=1)
    window = torch.arange(n - 32, n)
    ent = entropy_query_positions(n, req.vis, 32, 8, 128)
    pos = torch.cat([window, ent])
    q = torch.cat(req.query_rows(h_kv * group, pos))
    pos = pos.cuda()
    caches = req.caches if layers > 1 else req.caches[0]
    lay = req.layouts[0]
    scores, entropy = paged_scores_and_entropy(
        q, pos, 32, caches, lay, req.row, n, req.vis, backend="triton"
    )
    ref_s, ref_e = _separate(q, pos, 32, caches, lay, req, False, "torch")
    torch.testing.assert_close(scores, ref_s, atol=1e-3, rtol=1e-3)
    torch.testing.assert_close(entropy, ref_e, atol=1e-3, rtol=1e-3)
