"""paged_window_scores vs its torch path (the core's ``selection.attention_column_sums`` on
gathered K) vs dense brute force."""

import math

import pytest
import torch

from meda_vllm.kernels import paged_window_scores

DTYPES = [torch.float16, torch.bfloat16, torch.float32]


def brute_window_scores(q, q_pos, k_dense, scale):
    """Materialise every [R, n] attention matrix, one query head at a time."""
    heads, rows, _ = q.shape
    h_kv, n, _ = k_dense.shape
    group = heads // h_kv
    out = torch.zeros(h_kv, n, dtype=torch.float64)
    causal = torch.arange(n)[None, :] <= q_pos[:, None]
    for h in range(heads):
        s = (q[h].double() @ k_dense[h // group].double().T) * scale
        probs = torch.softmax(s.masked_fill(~causal, float("-inf")), dim=-1)
        out[h // group] += probs.sum(0)
    return (out / group).float()


def make_queries(heads, rows, head_size, dtype, n, seed=0, spread=2.0, window=True):
    gen = torch.Generator().manual_seed(seed)
    q = (torch.randn(heads, rows, head_size, generator=gen) * spread).to(dtype)
    if window:
        q_pos = torch.arange(n - rows, n)
    else:
        q_pos = torch.sort(torch.randperm(n, generator=gen)[:rows]).values
    return q, q_pos


def _run(p, group, rows, dtype, window=True, scale=None):
    q, q_pos = make_queries(
        p.layout.num_kv_heads * group, rows, p.layout.head_size, dtype, p.n, window=window
    )
    got = paged_window_scores(q, q_pos, p.cache, p.layout, p.row, p.n, scale, backend="triton")
    ref = paged_window_scores(q, q_pos, p.cache, p.layout, p.row, p.n, scale, backend="torch")
    dense = brute_window_scores(
        q, q_pos, p.dense()[0], scale or 1.0 / math.sqrt(p.layout.head_size)
    )
    assert got.dtype == torch.float32 and got.shape == (p.layout.num_kv_heads, p.n)
    torch.testing.assert_close(ref, dense, atol=2e-5, rtol=1e-4)
    torch.testing.assert_close(got, ref, atol=2e-5, rtol=1e-4)
    # each query row's probabilities sum to 1: total mass = rows per KV head
    torch.testing.assert_close(got.sum(1), torch.full((p.layout.num_kv_heads,), float(rows)))
    return got


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("head_size", [64, 80, 128])
def test_window_scores_dtype_head_size(paged, dtype, head_size):
    p = paged(kind="nhd", dtype=dtype, head_size=head_size, num_kv_heads=2, n=77)
    _run(p, group=4, rows=8, dtype=dtype)


@pytest.mark.parametrize(
    "kind,group,block_size,n,rows,window",
    [
        ("nhd", 1, 16, 200, 32, True),  # two key splits in the interpreter
        ("vec", 7, 16, 45, 12, False),  # sampled (non-contiguous) query rows
        ("hnd", 4, 128, 130, 16, True),
        ("vec", 1, 128, 20, 20, True),  # n < default window: the whole prompt is the window
        ("nhd", 7, 128, 5, 5, True),
    ],
)
def test_window_scores_layouts_gqa_ragged(layout_case, kind, group, block_size, n, rows, window):
    p = layout_case(kind, block_size, n, 2 if group < 7 else 1)
    _run(p, group=group, rows=rows, dtype=torch.bfloat16, window=window)


def test_window_scores_many_rows_and_scale(paged):
    # more rows than one row block (H2O-style long window), explicit scale, fp32
    p = paged(kind="vec", dtype=torch.float32, head_size=64, num_kv_heads=1, n=300)
    _run(p, group=1, rows=300, dtype=torch.float32, scale=0.05)


def test_window_scores_needle_wins(paged):
    # a key aligned with every window query gets the top score (planted needle)
    p = paged(kind="nhd", dtype=torch.float16, head_size=64, num_kv_heads=2, n=90)
    q, q_pos = make_queries(4, 8, 64, torch.float16, p.n)
    needle = 17
    b, t = int(p.row[needle // 16]), needle % 16
    p.cache[b, :, t, :64] = q.float().mean(dim=(1,)).view(2, 2, 64).mean(1).to(torch.float16) * 3
    scores = paged_window_scores(q, q_pos, p.cache, p.layout, p.row, p.n, backend="triton")
    assert bool((scores.argmax(1) == needle).all())


def test_window_scores_validation(paged):
    p = paged(n=30, num_kv_heads=2, head_size=64)
    q = torch.randn(4, 3, 64)
    pos = torch.tensor([27, 28, 29])
    with pytest.raises(ValueError, match="multiple"):
        paged_window_scores(torch.randn(3, 3, 64), pos, p.cache, p.layout, p.row, p.n)
    with pytest.raises(ValueError, match="head size"):
        paged_window_scores(torch.randn(4, 3, 32), pos, p.cache, p.layout, p.row, p.n)
    with pytest.raises(ValueError, match="outside"):
        paged_window_scores(q, torch.tensor([28, 29, 30]), p.cache, p.layout, p.row, p.n)
    with pytest.raises(ValueError, match="entries"):
        paged_window_scores(q, pos[:2], p.cache, p.layout, p.row, p.n)
    empty = paged_window_scores(q[:, :0], pos[:0], p.cache, p.layout, p.row, p.n, backend="triton")
    assert torch.equal(empty, torch.zeros(2, 30))


# ---------------------------------------------------------------------- pooling
@pytest.mark.gpu
@pytest.mark.parametrize("h_kv,group", [(32, 1), (4, 7)])
def test_window_scores_gpu_real_size(paged, h_kv, group):
    p = paged(
        kind="nhd", dtype=torch.bfloat16, head_size=128, num_kv_heads=h_kv, n=8192, device="cuda"
    )
    q, q_pos = make_queries(h_kv * group, 32, 128, torch.bfloat16, p.n)
    q, q_pos = q.cuda(), q_pos.cuda()
    got = paged_window_scores(q, q_pos, p.cache, p.layout, p.row, p.n)
    ref = paged_window_scores(q, q_pos, p.cache, p.layout, p.row, p.n, backend="torch")
    torch.testing.assert_close(got, ref, atol=1e-4, rtol=1e-3)
