"""PagedKVLayout constructors and validation; backend dispatch."""

import pytest
import torch

from meda_vllm.kernels import PagedKVLayout, gather_kv, resolve_backend
from meda_vllm.kernels.layout import check_cache


@pytest.mark.parametrize("kind", ["nhd", "hnd", "vec"])
@pytest.mark.parametrize("block_size", [16, 128])
def test_views_match_physical_order(paged, kind, block_size):
    p = paged(kind=kind, block_size=block_size, head_size=80, n=block_size + 5)
    k_view, v_view = p.layout.k_view(p.cache), p.layout.v_view(p.cache)
    k_ref, v_ref = p.dense()
    bs = block_size
    for i in (0, 1, bs - 1, bs, p.n - 1):
        b, t = int(p.row[i // bs]), i % bs
        assert torch.equal(k_view[b, :, t].float(), k_ref[:, i])
        assert torch.equal(v_view[b, :, t].float(), v_ref[:, i])


def test_from_logical_nhd_strides():
    phys = torch.zeros(5, 16, 4, 2 * 64)  # [nb, bs, H, 2D] as allocated
    layout = PagedKVLayout.from_logical(phys.permute(0, 2, 1, 3))
    assert (layout.block_size, layout.num_kv_heads, layout.head_size) == (16, 4, 64)
    assert layout.block_stride == 16 * 4 * 128
    assert layout.head_stride == 128
    assert (layout.k_offset, layout.k_token_stride, layout.k_dim_stride) == (0, 4 * 128, 1)
    assert (layout.v_offset, layout.v_token_stride, layout.v_dim_stride) == (64, 4 * 128, 1)


def test_cpu_vec_fields():
    layout = PagedKVLayout.cpu_vec(num_kv_heads=2, block_size=128, head_size=32)
    assert layout.block_stride == 2 * 128 * 64 and layout.head_stride == 128 * 64
    assert (layout.k_offset, layout.k_token_stride, layout.k_dim_stride) == (0, 1, 128)
    assert (layout.v_offset, layout.v_token_stride, layout.v_dim_stride) == (128 * 32, 32, 1)
    assert layout.extent(3) == 3 * 2 * 128 * 64


def test_layout_is_frozen_and_validated():
    layout = PagedKVLayout.cpu_vec(2, 16, 64)
    with pytest.raises(AttributeError):
        layout.block_size = 8
    with pytest.raises(ValueError, match="must be > 0"):
        PagedKVLayout.cpu_vec(0, 16, 64)
    with pytest.raises(ValueError, match="negative"):
        PagedKVLayout(16, 2, 64, 100, 10, 0, -1, 1, 0, 1, 1)
    with pytest.raises(ValueError, match="logical shape"):
        PagedKVLayout.from_logical(torch.zeros(4, 2, 16))


def test_check_cache_rejects_mismatches():
    cache = torch.zeros(4, 2, 16, 128)
    with pytest.raises(ValueError, match="logical shape"):
        check_cache(cache, PagedKVLayout.cpu_vec(2, 16, 32))
    with pytest.raises(ValueError, match="dtype"):
        check_cache(cache.to(torch.int32), PagedKVLayout.cpu_vec(2, 16, 64))
    with pytest.raises(ValueError, match="does not fit"):
        big = PagedKVLayout(16, 2, 64, 10**6, 128, 0, 1, 16, 1024, 64, 1)
        check_cache(cache, big)
    with pytest.raises(ValueError, match="PagedKVLayout"):
        check_cache(cache, "vec")
    # storage offset: a view 3 elements into a buffer still fits exactly
    buf = torch.zeros(4 * 2 * 16 * 128 + 3)
    check_cache(buf[3:].view(4, 2, 16, 128), PagedKVLayout.cpu_vec(2, 16, 64))


def test_row_and_n_validation(paged):
    p = paged(n=40, block_size=16)
    with pytest.raises(ValueError, match="block ids but"):
        gather_kv(p.cache, p.layout, p.row[:2], 40)
    with pytest.raises(ValueError, match="non-negative"):
        gather_kv(p.cache, p.layout, p.row, -1)
    with pytest.raises(ValueError, match="int32/int64"):
        gather_kv(p.cache, p.layout, p.row.float(), 40)
    bad = p.row.clone()
    bad[0] = 10_000
    with pytest.raises(ValueError, match="outside"):
        gather_kv(p.cache, p.layout, bad, 40)


def test_resolve_backend(monkeypatch):
    cpu = torch.device("cpu")
    monkeypatch.delenv("MEDA_KERNELS", raising=False)
    assert resolve_backend(None, cpu) == "torch"
    assert resolve_backend("triton", cpu) == "triton"
    assert resolve_backend(None, torch.device("cuda")) == "triton"
    monkeypatch.setenv("MEDA_KERNELS", "triton")
    assert resolve_backend(None, cpu) == "triton"
    assert resolve_backend("torch", cpu) == "torch"
    monkeypatch.setenv("MEDA_KERNELS", "cuda")
    with pytest.raises(ValueError, match="MEDA_KERNELS"):
        resolve_backend(None, cpu)
    with pytest.raises(ValueError, match="backend"):
        resolve_backend("fast", cpu)


def test_env_var_selects_backend(paged, monkeypatch):
    p = paged(n=20)
    monkeypatch.setenv("MEDA_KERNELS", "triton")
    k_t, _ = gather_kv(p.cache, p.layout, p.row, p.n)
    monkeypatch.setenv("MEDA_KERNELS", "torch")
    k_r, _ = gather_kv(p.cache, p.layout, p.row, p.n)
    assert torch.equal(k_t, k_r)
