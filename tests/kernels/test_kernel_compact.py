"""compact_ (in place) vs torch reference vs the dense decode, overlap included.

Compaction is per KV head, so the GQA ratio does not apply; the number of KV heads
(1, 4, 7) is varied instead.
"""

import pytest
import torch

from meda_vllm.kernels import compact_, paged_merge

DTYPES = [torch.float16, torch.bfloat16, torch.float32]


def kept_positions(h_kv, n, p_count, seed=0, identity_prefix=0):
    gen = torch.Generator().manual_seed(seed)
    rows = []
    for _ in range(h_kv):
        rest = torch.randperm(n - identity_prefix, generator=gen)[: p_count - identity_prefix]
        rows.append(
            torch.cat([torch.arange(identity_prefix), torch.sort(rest + identity_prefix).values])
        )
    return torch.stack(rows)


def clone_paged(p):
    """Same layout, separate storage (keeps the physical order of each kind)."""
    if p.kind == "nhd":
        return p.cache.permute(0, 2, 1, 3).clone().permute(0, 2, 1, 3)
    if p.kind == "hnd":
        buf = torch.empty(p.cache.numel() + 7, dtype=p.cache.dtype)
        out = buf[7:].view(p.cache.shape)
        out.copy_(p.cache)
        return out
    return p.cache.clone()


def _run(p, kept, new_k=None, new_v=None):
    before_k, before_v = p.dense()
    by_triton, by_torch = clone_paged(p), clone_paged(p)
    compact_(by_triton, p.layout, p.row, kept, new_k, new_v, backend="triton")
    compact_(by_torch, p.layout, p.row, kept, new_k, new_v, backend="torch")
    assert torch.equal(by_triton, by_torch)
    count = kept.shape[1]
    k, v = p.decode(by_triton, p.n)
    heads = torch.arange(kept.shape[0])[:, None]
    want_k = before_k[heads, kept] if new_k is None else new_k.to(p.cache.dtype).float()
    want_v = before_v[heads, kept] if new_v is None else new_v.to(p.cache.dtype).float()
    assert torch.equal(k[:, :count], want_k)
    assert torch.equal(v[:, :count], want_v)
    # slots >= P untouched
    assert torch.equal(k[:, count:], before_k[:, count:])
    assert torch.equal(v[:, count:], before_v[:, count:])
    # blocks outside the row untouched
    outside = sorted(set(range(p.cache.shape[0])) - set(p.row.tolist()))
    assert torch.equal(by_triton[outside], p.cache[outside])
    return by_triton


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("head_size", [64, 80, 128])
def test_compact_dtype_head_size(paged, dtype, head_size):
    p = paged(kind="nhd", dtype=dtype, head_size=head_size, num_kv_heads=2, n=50)
    _run(p, kept_positions(2, p.n, 20, identity_prefix=3))


@pytest.mark.parametrize(
    "kind,num_kv_heads,block_size,n,count",
    [
        ("vec", 4, 16, 45, 30),
        ("hnd", 7, 128, 130, 129),  # keeps all but one: every source overlaps
        ("nhd", 1, 128, 20, 7),
        ("vec", 1, 16, 600, 300),  # several write tiles in the interpreter
    ],
)
def test_compact_layouts_ragged(layout_case, kind, num_kv_heads, block_size, n, count):
    p = layout_case(kind, block_size, n, num_kv_heads)
    _run(p, kept_positions(num_kv_heads, n, count))


def test_compact_overlap_shift_by_one(paged):
    # kept = 1..n-1: every destination slot j is the source of slot j-1
    p = paged(kind="vec", dtype=torch.float32, head_size=64, num_kv_heads=2, n=300, block_size=16)
    kept = torch.arange(1, p.n).expand(2, -1).contiguous()
    _run(p, kept)


def test_compact_overlap_every_other_across_tiles(paged):
    # sources of the first write tile lie in the second tile's destinations
    p = paged(kind="nhd", dtype=torch.float16, head_size=64, num_kv_heads=2, n=1000, block_size=16)
    kept = torch.arange(0, p.n, 2).expand(2, -1).contiguous()
    _run(p, kept)


def test_compact_with_merged_values(paged):
    p = paged(kind="vec", dtype=torch.bfloat16, head_size=80, num_kv_heads=2, n=60)
    kept = kept_positions(2, p.n, 15)
    new_k, new_v = paged_merge(p.cache, p.layout, p.row, p.n, kept, backend="torch")
    _run(p, kept, new_k, new_v)
    _run(p, kept, new_k=torch.randn(2, 15, 80))  # fp32 source, only K replaced
    _run(p, kept, new_v=torch.randn(2, 15, 80).to(torch.bfloat16))


def test_compact_validation(paged):
    p = paged(n=40, num_kv_heads=2, head_size=64)
    kept = kept_positions(2, p.n, 10)
    with pytest.raises(ValueError, match="shape"):
        compact_(p.cache, p.layout, p.row, kept, new_k=torch.zeros(2, 9, 64))
    with pytest.raises(ValueError, match="ascending"):
        compact_(p.cache, p.layout, p.row, kept.flip(1))
    with pytest.raises(ValueError, match="outside"):
        compact_(p.cache, p.layout, p.row, kept + 1000)
    with pytest.raises(ValueError, match="float"):
        compact_(p.cache, p.layout, p.row, kept, new_v=torch.zeros(2, 10, 64, dtype=torch.int8))


@pytest.mark.gpu
def test_compact_gpu_overlap_large(paged):
    # many programs in flight: a write-before-read race would show up here
    p = paged(
        kind="nhd", dtype=torch.bfloat16, head_size=128, num_kv_heads=8, n=32768, device="cuda"
    )
    for kept in (torch.arange(1, p.n), torch.arange(0, p.n, 3)):
        kept = kept.expand(8, -1).contiguous().cuda()
        a = p.cache.permute(0, 2, 1, 3).clone().permute(0, 2, 1, 3)
        b = p.cache.permute(0, 2, 1, 3).clone().permute(0, 2, 1, 3)
        compact_(a, p.layout, p.row, kept)
        compact_(b, p.layout, p.row, kept, backend="torch")
        assert torch.equal(a, b)
