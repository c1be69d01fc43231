"""gather_kv / gather_kv_at: Triton vs torch reference vs a dense decode of the pages.

Gathering is per KV head, so the GQA ratio does not apply; the number of KV heads
(1, 4, 7) is varied instead.
"""

import pytest
import torch

from meda_vllm.kernels import gather_kv, gather_kv_at

DTYPES = [torch.float16, torch.bfloat16, torch.float32]


def _check(p, backend_out, ref_out, dense):
    for got, ref, want in zip(backend_out, ref_out, dense, strict=True):
        assert got.dtype == p.cache.dtype
        assert torch.equal(got, ref)
        assert torch.equal(ref.float(), want)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("head_size", [64, 80, 128])
def test_gather_dtype_head_size(paged, dtype, head_size):
    p = paged(kind="nhd", dtype=dtype, head_size=head_size, n=37)
    out = gather_kv(p.cache, p.layout, p.row, p.n, backend="triton")
    ref = gather_kv(p.cache, p.layout, p.row, p.n, backend="torch")
    _check(p, out, ref, p.dense())


@pytest.mark.parametrize(
    "kind,block_size,n,num_kv_heads,row_dtype",
    [
        ("nhd", 128, 130, 4, torch.int64),
        ("hnd", 16, 16, 7, torch.int32),
        ("hnd", 128, 5, 1, torch.int64),
        ("vec", 16, 50, 4, torch.int32),
        ("vec", 128, 129, 1, torch.int64),
        ("nhd", 16, 0, 2, torch.int32),
    ],
)
def test_gather_layouts_and_ragged(layout_case, kind, block_size, n, num_kv_heads, row_dtype):
    p = layout_case(kind, block_size, n, num_kv_heads, row_dtype=row_dtype)
    out = gather_kv(p.cache, p.layout, p.row, p.n, backend="triton")
    ref = gather_kv(p.cache, p.layout, p.row, p.n, backend="torch")
    _check(p, out, ref, p.dense())


@pytest.mark.parametrize("kind", ["nhd", "vec"])
def test_gather_at_positions(paged, kind):
    p = paged(kind=kind, dtype=torch.float16, head_size=64, block_size=16, n=70, num_kv_heads=4)
    gen = torch.Generator().manual_seed(1)
    pos = torch.stack([torch.randperm(p.n, generator=gen)[:25] for _ in range(4)])  # any order
    out = gather_kv_at(p.cache, p.layout, p.row, pos, backend="triton")
    ref = gather_kv_at(p.cache, p.layout, p.row, pos, backend="torch")
    k, v = p.dense()
    heads = torch.arange(4)[:, None]
    _check(p, out, ref, (k[heads, pos], v[heads, pos]))


def test_gather_at_validation(paged):
    p = paged(n=20)
    with pytest.raises(ValueError, match="heads"):
        gather_kv_at(p.cache, p.layout, p.row, torch.zeros(3, 4, dtype=torch.long))
    with pytest.raises(ValueError, match="outside"):
        gather_kv_at(p.cache, p.layout, p.row, torch.full((2, 1), 10_000))


@pytest.mark.gpu
def test_gather_gpu_large(paged):
    p = paged(
        kind="nhd", dtype=torch.bfloat16, num_kv_heads=8, head_size=128, n=20_000, device="cuda"
    )
    out = gather_kv(p.cache, p.layout, p.row, p.n)
    ref = gather_kv(p.cache, p.layout, p.row, p.n, backend="torch")
    assert torch.equal(out[0], ref[0]) and torch.equal(out[1], ref[1])
