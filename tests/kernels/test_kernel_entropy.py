"""paged_cross_modal_entropy vs its torch path (the core's ``entropy.cross_modal_entropy_terms``
on gathered K) vs per-row dense brute force."""

import math

import pytest
import torch

from meda_vllm.kernels import paged_cross_modal_entropy

DTYPES = [torch.float16, torch.bfloat16, torch.float32]


def brute_entropy(q, q_pos, k_dense, vis, scale, causal):
    """Row by row: softmax over the restricted key set, H = -sum p log p (float64)."""
    heads, rows, _ = q.shape
    group = heads // k_dense.shape[0]
    n = k_dense.shape[1]
    per_head = [[[], []] for _ in range(heads)]
    for h in range(heads):
        for r in range(rows):
            pos = int(q_pos[r])
            row_vis = bool(vis[pos])
            allowed = vis != row_vis
            if causal:
                allowed = allowed & (torch.arange(n) <= pos)
            if not bool(allowed.any()):
                continue
            s = (k_dense[h // group][allowed].double() @ q[h, r].double()) * scale
            p = torch.softmax(s, 0)
            per_head[h][int(row_vis)].append(float(-(p * p.log()).sum()))
    out = []
    for direction in (0, 1):
        means = [sum(v[direction]) / len(v[direction]) for v in per_head if v[direction]]
        out.append(sum(means) / len(means) if means else float("nan"))
    return torch.tensor(out, dtype=torch.float32)


def make_case(p, group, rows, dtype, vis_span=(0.2, 0.7), seed=0, spread=2.0):
    gen = torch.Generator().manual_seed(seed)
    heads = p.layout.num_kv_heads * group
    q = (torch.randn(heads, rows, p.layout.head_size, generator=gen) * spread).to(dtype)
    q_pos = torch.sort(torch.randperm(p.n, generator=gen)[:rows]).values
    vis = torch.zeros(p.n, dtype=torch.bool)
    vis[int(vis_span[0] * p.n) : int(vis_span[1] * p.n)] = True
    return q, q_pos, vis


def _run(p, q, q_pos, vis, causal=False, scale=None):
    args = (q, q_pos, p.cache, p.layout, p.row, p.n, vis, scale, causal)
    got = paged_cross_modal_entropy(*args, backend="triton")
    ref = paged_cross_modal_entropy(*args, backend="torch")
    dense = brute_entropy(
        q, q_pos, p.dense()[0], vis, scale or 1.0 / math.sqrt(p.layout.head_size), causal
    )
    assert got.shape == (2,) and got.dtype == torch.float32
    torch.testing.assert_close(ref, dense, atol=1e-5, rtol=1e-5, equal_nan=True)
    torch.testing.assert_close(got, ref, atol=1e-5, rtol=1e-5, equal_nan=True)
    return got


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("head_size", [64, 80, 128])
def test_entropy_dtype_head_size(paged, dtype, head_size):
    p = paged(kind="nhd", dtype=dtype, head_size=head_size, num_kv_heads=2, n=70)
    q, q_pos, vis = make_case(p, group=4, rows=10, dtype=dtype)
    got = _run(p, q, q_pos, vis)
    assert bool((got > 0).all())


@pytest.mark.parametrize(
    "kind,group,block_size,n,rows,causal",
    [
        ("nhd", 1, 16, 200, 16, False),  # two key splits in the interpreter
        ("vec", 7, 16, 45, 9, True),
        ("hnd", 4, 128, 130, 12, True),
        ("vec", 1, 128, 300, 40, True),
    ],
)
def test_entropy_layouts_gqa_causal(layout_case, kind, group, block_size, n, rows, causal):
    p = layout_case(kind, block_size, n, 2 if group < 7 else 1)
    q, q_pos, vis = make_case(p, group, rows, torch.bfloat16)
    _run(p, q, q_pos, vis, causal=causal)


def test_entropy_several_row_blocks(paged):
    # 7 x 40 = 280 rows per KV head: two row blocks (at most 256 in the interpreter, 128 on
    # a GPU), one program each; a qwen2-vl head's 7 x 160 sampled rows take nine on a GPU
    p = paged(kind="nhd", dtype=torch.float32, head_size=64, num_kv_heads=2, n=48)
    q, q_pos, vis = make_case(p, group=7, rows=40, dtype=torch.float32)
    _run(p, q, q_pos, vis, causal=True)


def test_entropy_empty_directions(paged):
    p = paged(kind="vec", dtype=torch.float32, head_size=64, num_kv_heads=1, n=40)
    q, q_pos, _ = make_case(p, group=2, rows=8, dtype=torch.float32)
    text_only = torch.zeros(p.n, dtype=torch.bool)
    # text rows have no visual keys, there are no visual rows: both directions are empty,
    # NaN as in the core's cross_modal_entropy (MEDA then uses uniform budgets)
    assert _run(p, q, q_pos, text_only).isnan().all()
    all_vis = torch.ones(p.n, dtype=torch.bool)
    assert _run(p, q, q_pos, all_vis).isnan().all()


def test_entropy_causal_skips_rows_without_visible_keys(paged):
    # image at the end: with causal=True every text row before it sees no visual key
    p = paged(kind="nhd", dtype=torch.float32, head_size=64, num_kv_heads=2, n=60)
    q, _, vis = make_case(p, group=2, rows=6, dtype=torch.float32, vis_span=(0.5, 1.0))
    q_pos = torch.tensor([3, 10, 20, 35, 45, 59])  # text, text, text, vis, vis, vis
    got = _run(p, q, q_pos, vis, causal=True)
    assert got[0].isnan() and got[1] > 0
    non_causal = _run(p, q, q_pos, vis, causal=False)
    assert non_causal[0] > 0


def test_entropy_uniform_keys_is_log_count(paged):
    # identical keys: every restricted softmax is uniform, H = log(#keys)
    p = paged(kind="hnd", dtype=torch.float32, head_size=64, num_kv_heads=1, n=32)
    p.cache[:, :, :, :64] = 0.5  # hnd: the logical K half is the physical K
    q, q_pos, vis = make_case(p, group=1, rows=32, dtype=torch.float32, vis_span=(0.25, 0.75))
    got = _run(p, torch.randn(1, 32, 64), torch.arange(32), vis)
    n_vis = int(vis.sum())
    torch.testing.assert_close(got, torch.tensor([math.log(n_vis), math.log(32 - n_vis)]))


def test_entropy_validation(paged):
    p = paged(n=30, num_kv_heads=2, head_size=64)
    q, q_pos, vis = make_case(p, group=1, rows=4, dtype=torch.float32)
    with pytest.raises(ValueError, match="bool"):
        paged_cross_modal_entropy(q, q_pos, p.cache, p.layout, p.row, p.n, vis.int())
    with pytest.raises(ValueError, match="entries"):
        paged_cross_modal_entropy(q, q_pos, p.cache, p.layout, p.row, p.n, vis[:-1])


@pytest.mark.gpu
@pytest.mark.parametrize("h_kv,group", [(32, 1), (4, 7)])
def test_entropy_gpu_real_size(paged, h_kv, group):
    p = paged(
        kind="nhd", dtype=torch.bfloat16, head_size=128, num_kv_heads=h_kv, n=8192, device="cuda"
    )
    q, q_pos, vis = make_case(p, group, 96, torch.bfloat16)
    q, q_pos, vis = q.cuda(), q_pos.cuda(), vis.cuda()
    args = (q, q_pos, p.cache, p.layout, p.row, p.n, vis)
    got = paged_cross_modal_entropy(*args)
    ref = paged_cross_modal_entropy(*args, backend="torch")
    torch.testing.assert_close(got, ref, atol=1e-4, rtol=1e-4)
