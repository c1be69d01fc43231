"""The CPU page layout is read off CPU_ATTN's own write op; check it against the op."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("vllm")

from vllm import _custom_ops as ops  # noqa: E402
from vllm.v1.attention.backends.cpu_attn import _get_attn_isa  # noqa: E402

from meda_vllm.kernels import PagedKVLayout, gather_kv  # noqa: E402
from meda_vllm.vllm_adapter.layouts import probe_cpu_layout  # noqa: E402


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("heads, block_size, head_size", [(2, 32, 32), (4, 128, 64)])
def test_probed_layout_reads_back_what_vllm_wrote(dtype, heads, block_size, head_size):
    isa = _get_attn_isa(dtype, block_size, head_size)
    num_blocks, n = 5, 3 * block_size - 7
    cache = torch.zeros(num_blocks, heads, block_size, 2 * head_size, dtype=dtype)
    try:
        layout = probe_cpu_layout(cache, isa)
    except RuntimeError as e:  # an ISA with tiled pages is refused, not misread
        pytest.skip(str(e))
    row = torch.tensor([3, 0, 4], dtype=torch.int32)
    keys = torch.randn(n, heads, head_size).to(dtype)
    values = torch.randn(n, heads, head_size).to(dtype)
    slots = row.long()[torch.arange(n) // block_size] * block_size + torch.arange(n) % block_size
    kc, vc = cache.view(num_blocks, heads, 2 * block_size, head_size).chunk(2, dim=2)
    ops.cpu_attn_reshape_and_cache(keys, values, kc, vc, slots, isa)
    k, v = gather_kv(cache, layout, row, n)
    torch.testing.assert_close(k, keys.transpose(0, 1), rtol=0, atol=0)
    torch.testing.assert_close(v, values.transpose(0, 1), rtol=0, atol=0)
    if isa == "vec":
        assert layout == PagedKVLayout.cpu_vec(heads, block_size, head_size)
