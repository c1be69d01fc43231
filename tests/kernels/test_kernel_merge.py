"""paged_merge / merge_match vs their torch path (the core's ``merging.nearest_kept`` and
``merge_into_kept`` on gathered K, V) vs a per-token brute force.

Merging is per KV head, so the GQA ratio does not apply; the number of KV heads
(1, 4, 7) is varied instead.
"""

import pytest
import torch
import torch.nn.functional as F

from meda_vllm.kernels import merge_match, paged_merge

DTYPES = [torch.float16, torch.bfloat16, torch.float32]


def brute_merge(k, v, kept, mode, scores):
    """Token by token with F.cosine_similarity; k, v dense [H_kv, n, D] fp32."""
    h_kv, n, _ = k.shape
    out_k, out_v, matches = [], [], []
    for h in range(h_kv):
        kept_h = kept[h].tolist()
        evicted = [i for i in range(n) if i not in set(kept_h)]
        w = scores[h].double() if scores is not None else torch.ones(n, dtype=torch.float64)
        acc = {
            name: x[h, kept_h].double() * (w[kept_h, None] if name.startswith("w") else 1.0)
            for name, x in (("k", k), ("v", v), ("wk", k), ("wv", v))
        }
        count = torch.ones(len(kept_h), dtype=torch.float64)
        w_sum = w[kept_h].clone()
        match_h = []
        for e in evicted:
            sim = F.cosine_similarity(k[h, e][None].double(), k[h, kept_h].double(), dim=-1)
            j = int(torch.argmax(sim))  # first maximum
            match_h.append(j)
            count[j] += 1
            w_sum[j] += w[e]
            acc["k"][j] += k[h, e]
            acc["v"][j] += v[h, e]
            acc["wk"][j] += w[e] * k[h, e]
            acc["wv"][j] += w[e] * v[h, e]
        new_k, new_v = acc["k"] / count[:, None], acc["v"] / count[:, None]
        if mode == "weighted":
            pos = (w_sum > 0)[:, None]
            new_k = torch.where(pos, acc["wk"] / w_sum.clamp(min=1e-300)[:, None], new_k)
            new_v = torch.where(pos, acc["wv"] / w_sum.clamp(min=1e-300)[:, None], new_v)
        out_k.append(new_k.float())
        out_v.append(new_v.float())
        matches.append(torch.tensor(match_h, dtype=torch.long))
    return torch.stack(out_k), torch.stack(out_v), torch.stack(matches)


def random_kept(h_kv, n, s, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return torch.stack(
        [torch.sort(torch.randperm(n, generator=gen)[:s]).values for _ in range(h_kv)]
    )


def _run(p, kept, mode="average", scores=None, store_tol=None):
    args = (p.cache, p.layout, p.row, p.n, kept, mode, scores)
    got = paged_merge(*args, backend="triton")
    ref = paged_merge(*args, backend="torch")
    k, v = p.dense()
    want_k, want_v, want_match = brute_merge(k, v, kept, mode, scores)
    evicted, match = merge_match(p.cache, p.layout, p.row, p.n, kept, backend="triton")
    assert torch.equal(match, merge_match(p.cache, p.layout, p.row, p.n, kept, backend="torch")[1])
    assert torch.equal(match, want_match)
    for h in range(kept.shape[0]):
        assert not bool(torch.isin(evicted[h], kept[h]).any())
        assert evicted.shape[1] + kept.shape[1] == p.n
    atol, rtol = store_tol[p.cache.dtype]
    for g, r, w in zip(got, ref, (want_k, want_v), strict=True):
        assert g.dtype == p.cache.dtype and g.shape == (
            kept.shape[0],
            kept.shape[1],
            p.layout.head_size,
        )
        torch.testing.assert_close(r.float(), w, atol=atol, rtol=rtol)
        # triton and torch round the same fp32 value except for summation order
        torch.testing.assert_close(g.float(), r.float(), atol=atol, rtol=rtol)
    return got


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("head_size", [64, 80, 128])
def test_merge_dtype_head_size(paged, store_tol, dtype, head_size):
    p = paged(kind="nhd", dtype=dtype, head_size=head_size, num_kv_heads=2, n=50)
    _run(p, random_kept(2, p.n, 12), store_tol=store_tol)


@pytest.mark.parametrize(
    "kind,num_kv_heads,block_size,n,kept_count,mode",
    [
        ("vec", 4, 16, 45, 8, "weighted"),
        ("hnd", 7, 128, 130, 3, "average"),  # two evicted tiles in the interpreter
        ("nhd", 1, 128, 20, 19, "weighted"),
        ("vec", 1, 16, 17, 1, "average"),  # everything merges into one token
    ],
)
def test_merge_layouts_ragged(
    layout_case, store_tol, kind, num_kv_heads, block_size, n, kept_count, mode
):
    p = layout_case(kind, block_size, n, num_kv_heads)
    scores = torch.rand(num_kv_heads, n) if mode == "weighted" else None
    _run(p, random_kept(num_kv_heads, n, kept_count), mode, scores, store_tol)


def test_merge_weighted_zero_weights_fall_back_to_average(paged, store_tol):
    p = paged(kind="nhd", dtype=torch.float32, head_size=64, num_kv_heads=2, n=40)
    kept = random_kept(2, p.n, 10)
    scores = torch.rand(2, p.n)
    scores[0] = 0.0  # head 0: all weights zero -> plain average
    scores[1, :20] = 0.0  # head 1: some groups with zero weight only
    got = _run(p, kept, "weighted", scores, store_tol)
    avg = paged_merge(p.cache, p.layout, p.row, p.n, kept, "average", backend="torch")
    assert torch.equal(got[0][0], avg[0][0]) and torch.equal(got[1][0], avg[1][0])


def test_merge_nothing_evicted_is_bit_exact(paged, store_tol):
    p = paged(kind="vec", dtype=torch.bfloat16, head_size=80, num_kv_heads=2, n=33)
    kept = torch.arange(p.n).expand(2, -1).contiguous()
    for mode, scores in (("average", None), ("weighted", torch.rand(2, p.n))):
        got = _run(p, kept, mode, scores, store_tol)
        k, v = p.dense()
        assert torch.equal(got[0].float(), k) and torch.equal(got[1].float(), v)


def test_merge_ties_pick_lowest_kept_index(paged, store_tol):
    p = paged(kind="hnd", dtype=torch.float32, head_size=64, num_kv_heads=1, n=30)
    kept = torch.tensor([[2, 5, 9, 20, 27]])
    bs = p.layout.block_size
    kv = p.layout.k_view(p.cache)

    def key(i):
        return kv[int(p.row[i // bs]), 0, i % bs]

    for i in (5, 20):  # kept j=1 and j=3 share a direction with evicted token 11
        key(i).copy_(key(11) * (2.0 if i == 20 else 1.0))
    got_match = merge_match(p.cache, p.layout, p.row, p.n, kept, backend="triton")
    evicted, match = got_match
    assert int(match[0, (evicted[0] == 11).nonzero()[0, 0]]) == 1
    _run(p, kept, store_tol=store_tol)


def test_merge_validation(paged):
    p = paged(n=30, num_kv_heads=2)
    kept = random_kept(2, p.n, 5)
    with pytest.raises(ValueError, match="mode"):
        paged_merge(p.cache, p.layout, p.row, p.n, kept, mode="pivotal")
    with pytest.raises(ValueError, match="needs scores"):
        paged_merge(p.cache, p.layout, p.row, p.n, kept, mode="weighted")
    with pytest.raises(ValueError, match="ascending"):
        paged_merge(p.cache, p.layout, p.row, p.n, kept.flip(1))
    with pytest.raises(ValueError, match="empty"):
        paged_merge(p.cache, p.layout, p.row, p.n, kept[:, :0])
    with pytest.raises(ValueError, match="scores"):
        paged_merge(p.cache, p.layout, p.row, p.n, kept, "weighted", torch.rand(2, 29))


@pytest.mark.gpu
@pytest.mark.parametrize("h_kv", [32, 4])
def test_merge_gpu_real_size(paged, h_kv):
    p = paged(
        kind="nhd", dtype=torch.bfloat16, head_size=128, num_kv_heads=h_kv, n=4096, device="cuda"
    )
    kept = random_kept(h_kv, p.n, 820).cuda()
    scores = torch.rand(h_kv, p.n, device="cuda")
    for mode in ("average", "weighted"):
        got = paged_merge(p.cache, p.layout, p.row, p.n, kept, mode, scores)
        ref = paged_merge(p.cache, p.layout, p.row, p.n, kept, mode, scores, backend="torch")
        torch.testing.assert_close(got[0], ref[0], atol=2e-2, rtol=1.6e-2)
        torch.testing.assert_close(got[1], ref[1], atol=2e-2, rtol=1.6e-2)
