"""Window scores against brute force, pooling, deterministic ranking, bounded memory."""

from __future__ import annotations

import math

import pytest
import torch

from meda_vllm import selection
from meda_vllm.selection import (
    attention_column_sums,
    last_rows,
    pool_scores,
    rank_positions,
    recent_mask,
    topk_with_forced,
    window_scores,
)
from meda_vllm.types import LayerView


def brute_force_scores(q_all, keys, positions):
    """Full N x N causal attention (fp64), rows at ``positions``, mean over the group."""
    h, n, d = q_all.shape
    group = h // keys.shape[0]
    k = keys.double().repeat_interleave(group, 0)
    logits = torch.einsum("hid,hjd->hij", q_all.double(), k) / math.sqrt(d)
    logits = logits.masked_fill(torch.ones(n, n, dtype=torch.bool).triu(1), float("-inf"))
    att = torch.softmax(logits, -1)[:, positions]  # [H, R, N]
    return att.sum(1).view(keys.shape[0], group, n).mean(1)


@pytest.mark.parametrize("group", [1, 4, 7])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("n", [1, 7, 50])
def test_column_sums_match_brute_force(group, dtype, n):
    gen = torch.Generator().manual_seed(n + group)
    h_kv, d = 2, 16
    q = torch.randn(h_kv * group, n, d, generator=gen).to(dtype)
    k = torch.randn(h_kv, n, d, generator=gen).to(dtype)
    positions = torch.arange(max(0, n - 8), n)
    got = attention_column_sums(q[:, positions], positions, k, 1 / math.sqrt(d))
    want = brute_force_scores(q.float(), k.float(), positions)
    assert got.dtype == torch.float32 and got.shape == (h_kv, n)
    torch.testing.assert_close(got.double(), want, atol=1e-5, rtol=1e-4)
    # each row is a distribution over the keys it sees
    assert math.isclose(float(got.sum()), h_kv * positions.numel(), rel_tol=1e-5)


def test_column_sums_are_causal():
    gen = torch.Generator().manual_seed(0)
    q = torch.randn(2, 3, 8, generator=gen)
    k = torch.randn(2, 20, 8, generator=gen)
    got = attention_column_sums(q, torch.tensor([3, 5, 9]), k, 0.3)
    assert torch.all(got[:, 10:] == 0)
    assert torch.all(got[:, :10] > 0)


def test_sparse_rows_use_their_own_positions():
    gen = torch.Generator().manual_seed(1)
    q_all = torch.randn(4, 30, 8, generator=gen)
    k = torch.randn(2, 30, 8, generator=gen)
    pos = torch.tensor([2, 11, 17, 29])
    got = attention_column_sums(q_all[:, pos], pos, k, 1 / math.sqrt(8))
    torch.testing.assert_close(got.double(), brute_force_scores(q_all, k, pos), atol=1e-5, rtol=0)


def test_chunking_does_not_change_the_result(monkeypatch):
    gen = torch.Generator().manual_seed(2)
    q = torch.randn(8, 40, 16, generator=gen)
    k = torch.randn(2, 300, 16, generator=gen)
    pos = torch.arange(260, 300)
    full = attention_column_sums(q, pos, k, 0.25)
    biggest = []
    real_matmul = torch.matmul

    def spy(a, b):
        out = real_matmul(a, b)
        biggest.append(out.numel())
        return out

    monkeypatch.setattr(selection, "_MAX_ELEMS", 4 * 300 * 3)
    monkeypatch.setattr(torch, "matmul", spy)
    chunked = attention_column_sums(q, pos, k, 0.25)
    torch.testing.assert_close(chunked, full)
    assert max(biggest) <= 4 * 300 * 3


def test_window_scores_use_override():
    n = 12
    override = torch.rand(1, n)
    view = LayerView(
        keys=torch.randn(1, n, 4),
        values=torch.randn(1, n, 4),
        queries=torch.full((2, 3, 4), float("nan")),  # recomputing would give NaN
        query_pos=torch.arange(n - 3, n),
        window_scores=override,
    )
    assert torch.equal(window_scores(view, 3), override)


def test_missing_rows_are_reported():
    with pytest.raises(ValueError, match=r"\[8\]"):
        last_rows(torch.tensor([5, 6, 7, 9]), 10, 5)


def naive_pool(x, k, mode):
    n = x.shape[1]
    out = torch.empty_like(x)
    for i in range(n):
        lo, hi = max(0, i - k // 2), min(n, i + k // 2 + 1)
        if mode == "max":
            out[:, i] = x[:, lo:hi].max(1).values
        else:  # zero padding counted, as torch's avg_pool1d
            out[:, i] = x[:, lo:hi].sum(1) / k
    return out


@pytest.mark.parametrize("mode", ["max", "avg"])
@pytest.mark.parametrize(("n", "k"), [(1, 7), (5, 7), (40, 7), (40, 1), (40, 3)])
def test_pooling_matches_naive(mode, n, k):
    x = torch.rand(3, n)
    torch.testing.assert_close(pool_scores(x, mode, k), naive_pool(x, k, mode))
    assert torch.equal(pool_scores(x, "none", k), x)


def test_rank_order_tier_score_tiebreak_recency():
    score = torch.tensor([[1.0, 3.0, 3.0, 0.0, 2.0, 3.0]])
    tiebreak = torch.tensor([[0.0, 0.5, 0.9, 0.0, 0.0, 0.5]])
    tier = torch.tensor([0, 0, 0, 1, 0, 0])
    order = rank_positions(score, tiebreak=tiebreak, tier=tier)
    # tier first; then score 3 with tiebreak 0.9; then the later of the two ties; ...
    assert order.tolist() == [[3, 2, 5, 1, 4, 0]]


def test_rank_is_deterministic_on_ties():
    score = torch.zeros(2, 50)
    a = rank_positions(score)
    assert torch.equal(a, rank_positions(score))
    assert a[0].tolist() == list(range(49, -1, -1))  # ties go to recency


def test_topk_with_forced_keeps_forced_and_best():
    score = torch.tensor([[5.0, 4.0, 0.0, 0.0, 3.0, 0.0, 0.0]])
    forced = recent_mask(7, 2)
    kept = topk_with_forced(score, 4, forced)
    assert kept.tolist() == [[0, 1, 5, 6]]


def test_nan_scores_rank_last():
    score = torch.tensor([[float("nan"), 1.0, 0.5]])
    assert rank_positions(score).tolist() == [[1, 2, 0]]


def test_rank_positions_skips_a_tiebreak_that_is_the_score_itself():
    """Unpooled policies pass the raw score as both keys: one sort fewer, same order."""
    g = torch.Generator().manual_seed(5)
    score = torch.randint(0, 4, (3, 50), generator=g).float()  # many ties
    tier = (torch.rand(3, 50, generator=g) > 0.8).to(torch.int64)
    same = rank_positions(score, tiebreak=score, tier=tier)
    assert torch.equal(same, rank_positions(score, tiebreak=score.clone(), tier=tier))
    assert torch.equal(same, rank_positions(score, tier=tier))


def _rank_three_sorts(score, tiebreak=None, tier=None):
    """The ranking as three successive stable sorts (tiebreak, score, tier as int64): the
    spec that rank_positions (8-bit tier keys) must reproduce."""
    h, n = score.shape
    order = torch.arange(n - 1, -1, -1).expand(h, n).contiguous()

    def by(key):
        vals = key.gather(1, order)
        return order.gather(1, torch.sort(vals, dim=1, descending=True, stable=True).indices)

    if tiebreak is not None:
        order = by(torch.nan_to_num(tiebreak.float(), nan=float("-inf")))
    order = by(torch.nan_to_num(score.float(), nan=float("-inf")))
    if tier is not None:
        order = by(tier.to(torch.int64).expand(h, n))
    return order


@pytest.mark.parametrize("seed", range(6))
def test_ranking_equals_successive_int64_sorts(seed):
    """Ties, signed zeros, infinities, NaN, negative and denormal scores, 1-D and 2-D
    tiers: the same order as sorting by tiebreak, then score, then tier (as int64)."""
    g = torch.Generator().manual_seed(seed)
    special = torch.tensor(
        [0.0, -0.0, float("inf"), -float("inf"), float("nan"), 1e-40, -1e-40, -3.5, 2.0]
    )
    score = special[torch.randint(0, len(special), (4, 300), generator=g)]
    score = torch.where(torch.rand(4, 300, generator=g) < 0.5, torch.randn(4, 300), score)
    tiebreak = torch.randint(0, 3, (4, 300), generator=g).float()
    for tier in (None, torch.randint(0, 3, (300,), generator=g), torch.randint(0, 4, (4, 300))):
        want = _rank_three_sorts(score, tiebreak, tier)
        assert torch.equal(rank_positions(score, tiebreak=tiebreak, tier=tier), want)
        want = _rank_three_sorts(score, None, tier)
        assert torch.equal(rank_positions(score, tier=tier), want)
