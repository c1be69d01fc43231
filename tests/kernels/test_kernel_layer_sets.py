"""Layer sets: every op given a sequence of layer caches (``LayerSet``: one launch for all
layers, heads layer-major) must equal the same op run layer by layer.

The caches are separate allocations passed out of allocation order, so the kernels'
per-head offsets from the first cache are negative for some layers and positive for
others, as they may be for vLLM's per-layer caches.
"""

from __future__ import annotations

import pytest
import torch

from meda_vllm.kernels import (
    compact_,
    gather_kv,
    gather_kv_at,
    merge_match,
    paged_cross_modal_entropy,
    paged_merge,
    paged_window_scores,
)
from meda_vllm.kernels.layout import check_caches
from meda_vllm.testing.synthetic import paged_request

ORDER = [2, 0, 1]  # not the allocation order


def _set(layout="nhd", dtype=torch.float32, n=70, h_kv=2, d=32, bs=16, device="cpu"):
    req = paged_request(n, 3, h_kv, d, bs, layout=layout, dtype=dtype, device=device, seed=3)
    caches = [req.caches[i] for i in ORDER]
    return req, caches, req.layouts[0]


def _kept(heads, n, count, seed=0, device="cpu"):
    gen = torch.Generator().manual_seed(seed)
    return torch.stack(
        [torch.sort(torch.randperm(n, generator=gen)[:count]).values for _ in range(heads)]
    ).to(device)


def _per_layer(caches, fn, *head_major, heads):
    """Run ``fn(cache, *args_l)`` per layer on the ``heads``-row slices of head-major args."""
    outs = []
    for i, cache in enumerate(caches):
        outs.append(fn(cache, *(t[i * heads : (i + 1) * heads] for t in head_major)))
    return outs


def _close(a, b, dtype):
    tol = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 2e-2}[dtype]
    torch.testing.assert_close(a.float(), b.float(), rtol=tol, atol=tol)


@pytest.mark.parametrize("backend", ["triton", "torch"])
@pytest.mark.parametrize("layout,dtype", [("nhd", torch.float32), ("cpu_vec", torch.bfloat16)])
def test_scores_and_entropy_of_a_layer_set(backend, layout, dtype):
    req, caches, lay = _set(layout, dtype)
    n, h, group = req.n, 4, 2
    pos = torch.arange(n - 12, n)
    q = torch.cat(req.query_rows(h, pos))  # [3 * H, R, D], layer-major
    got = paged_window_scores(q, pos, caches, lay, req.row, n, backend=backend)
    assert got.shape == (3 * h // group, n)
    want = _per_layer(
        caches,
        lambda c, ql: paged_window_scores(ql, pos, c, lay, req.row, n, backend="torch"),
        q,
        heads=h,
    )
    _close(got, torch.cat(want), torch.float32)

    ent = paged_cross_modal_entropy(q, pos, caches, lay, req.row, n, req.vis, backend=backend)
    assert ent.shape == (3, 2)
    want = _per_layer(
        caches,
        lambda c, ql: paged_cross_modal_entropy(
            ql, pos, c, lay, req.row, n, req.vis, backend="torch"
        ),
        q,
        heads=h,
    )
    _close(ent, torch.stack(want), torch.float32)


@pytest.mark.parametrize("backend", ["triton", "torch"])
@pytest.mark.parametrize("mode", ["average", "weighted"])
def test_merge_of_a_layer_set(backend, mode):
    dtype = torch.float32
    req, caches, lay = _set("nhd", dtype)
    n, h_kv = req.n, lay.num_kv_heads
    kept = _kept(3 * h_kv, n, 20)
    scores = torch.rand(3 * h_kv, n) if mode == "weighted" else None
    got_k, got_v = paged_merge(caches, lay, req.row, n, kept, mode, scores, backend=backend)
    want = _per_layer(
        caches,
        lambda c, k, *s: paged_merge(
            c, lay, req.row, n, k, mode, s[0] if s else None, backend="torch"
        ),
        kept,
        *([scores] if scores is not None else []),
        heads=h_kv,
    )
    _close(got_k, torch.cat([w[0] for w in want]), dtype)
    _close(got_v, torch.cat([w[1] for w in want]), dtype)
    evicted, match = merge_match(caches, lay, req.row, n, kept, backend=backend)
    want = _per_layer(
        caches, lambda c, k: merge_match(c, lay, req.row, n, k, backend="torch"), kept, heads=h_kv
    )
    assert torch.equal(evicted, torch.cat([w[0] for w in want]))
    assert torch.equal(match, torch.cat([w[1] for w in want]))


@pytest.mark.parametrize("backend", ["triton", "torch"])
@pytest.mark.parametrize("merged", [False, True])
def test_gather_and_compaction_of_a_layer_set(backend, merged):
    req, caches, lay = _set("cpu_vec", torch.float16)
    n, h_kv, d = req.n, lay.num_kv_heads, lay.head_size
    k_all, v_all = gather_kv(caches, lay, req.row, n, backend=backend)
    for i, cache in enumerate(caches):
        k, v = gather_kv(cache, lay, req.row, n, backend="torch")
        assert torch.equal(k_all[i * h_kv : (i + 1) * h_kv], k)
        assert torch.equal(v_all[i * h_kv : (i + 1) * h_kv], v)
    kept = _kept(3 * h_kv, n, 33, seed=1)
    at_k, _ = gather_kv_at(caches, lay, req.row, kept, backend=backend)
    new_k = new_v = None
    if merged:
        new_k = torch.randn(3 * h_kv, 33, d)
        new_v = torch.randn(3 * h_kv, 33, d)
    expect = [c.clone() for c in caches]
    for i, cache in enumerate(expect):
        sl = slice(i * h_kv, (i + 1) * h_kv)
        k, v = (None, None) if new_k is None else (new_k[sl], new_v[sl])
        compact_(cache, lay, req.row, kept[sl], k, v, backend="torch")
    compact_(caches, lay, req.row, kept, new_k, new_v, backend=backend)
    for got, want in zip(caches, expect, strict=True):
        assert torch.equal(got, want)
    first_k, _ = gather_kv(caches, lay, req.row, 33, backend="torch")
    assert torch.equal(first_k, new_k.half() if merged else at_k)


def test_layer_set_validation():
    req, caches, lay = _set("nhd", torch.float32)
    with pytest.raises(ValueError, match="non-empty sequence"):
        check_caches([], lay)
    with pytest.raises(ValueError, match="share dtype"):
        check_caches([caches[0], caches[1].half()], lay)
    kept = _kept(lay.num_kv_heads, req.n, 10)  # one layer's heads for a set of three
    with pytest.raises(ValueError, match="heads"):
        paged_merge(caches, lay, req.row, req.n, kept)
    q = torch.randn(4, 3, lay.head_size)  # 4 query heads cannot cover 3 x 2 KV heads
    with pytest.raises(ValueError, match="multiple of KV heads"):
        paged_window_scores(q, torch.arange(3), caches, lay, req.row, req.n)


@pytest.mark.gpu
@pytest.mark.parametrize("h_kv,group", [(32, 1), (4, 7)])
def test_layer_set_gpu_real_size(h_kv, group):
    """All 28-32 layers at once on a GPU equal the layer-by-layer kernels (real geometry)."""
    layers, n, d = 4, 8192, 128
    req = paged_request(n, layers, h_kv, d, 16, dtype=torch.bfloat16, device="cuda", seed=5)
    caches, lay = req.caches, req.layouts[0]
    pos = torch.arange(n - 32, n, device="cuda")
    q = torch.cat(req.query_rows(h_kv * group, pos.cpu()))
    got = paged_window_scores(q, pos, caches, lay, req.row, n)
    want = _per_layer(
        caches, lambda c, ql: paged_window_scores(ql, pos, c, lay, req.row, n), q,
        heads=h_kv * group,
    )  # fmt: skip
    torch.testing.assert_close(got, torch.cat(want), rtol=1e-4, atol=1e-5)
    kept = _kept(layers * h_kv, n, n // 5, device="cuda")
    got_k, _ = paged_merge(caches, lay, req.row, n, kept)
    want = _per_layer(caches, lambda c, k: paged_merge(c, lay, req.row, n, k)[0], kept, heads=h_kv)
    torch.testing.assert_close(got_k, torch.cat(want), rtol=0, atol=0)
