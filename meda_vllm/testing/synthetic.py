"""A request's prompt KV laid out in paged caches, for tests, benchmarks and the compile
check (no vLLM): the one builder of synthetic paged requests.

:func:`paged_request` fills ``layers`` cache tensors (one per layer, shared block-table row,
shuffled block ids, a few spare blocks) with random keys and values, the way vLLM's
worker holds a request after its prefill: on GPU in NHD order (``[nb, bs, H, 2D]``
allocated, seen as ``[nb, H, bs, 2D]``), on CPU in CPU_ATTN's ``vec`` page order.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from meda_vllm.kernels.layout import PagedKVLayout


@dataclass
class PagedRequest:
    caches: list[Tensor]
    layouts: list[PagedKVLayout]
    row: Tensor
    vis: Tensor
    n: int

    def query_rows(self, heads: int, positions: Tensor, seed: int = 1) -> list[Tensor]:
        """Random captured query rows ``[H, R, D]`` per layer at ``positions``."""
        gen = torch.Generator().manual_seed(seed)
        d = self.layouts[0].head_size
        cache = self.caches[0]
        return [
            (torch.randn(heads, positions.numel(), d, generator=gen) * 2)
            .to(cache.dtype)
            .to(cache.device)
            for _ in self.caches
        ]


def paged_request(
    n: int,
    layers: int,
    num_kv_heads: int,
    head_size: int,
    block_size: int = 16,
    *,
    layout: str = "nhd",
    dtype: torch.dtype = torch.float32,
    device: torch.device | str = "cpu",
    seed: int = 0,
) -> PagedRequest:
    """``n`` prompt tokens (an image/video span from 5 % to 90 %, text around it) in
    ``layers`` paged caches. ``layout``: ``"nhd"`` (GPU backends) or ``"cpu_vec"``."""
    if layout not in ("nhd", "cpu_vec"):
        raise ValueError(f"layout must be 'nhd' or 'cpu_vec', got {layout!r}")
    device = torch.device(device)
    gen = torch.Generator().manual_seed(seed)
    dev_gen = torch.Generator(device=device).manual_seed(seed)  # caches are made in place
    used = -(-n // block_size)
    nb = used + 4
    row = torch.randperm(nb, generator=gen)[:used].to(torch.int32).to(device)
    caches, layouts = [], []
    for _ in range(layers):
        if layout == "nhd":
            shape = (nb, block_size, num_kv_heads, 2 * head_size)
            cache = torch.randn(shape, generator=dev_gen, device=device, dtype=dtype)
            cache = cache.permute(0, 2, 1, 3)
            lay = PagedKVLayout.from_logical(cache)
        else:
            shape = (nb, num_kv_heads, block_size, 2 * head_size)
            cache = torch.randn(shape, generator=dev_gen, device=device, dtype=dtype)
            lay = PagedKVLayout.cpu_vec(num_kv_heads, block_size, head_size)
        caches.append(cache)
        layouts.append(lay)
    return PagedRequest(caches, layouts, row, synthetic_vis(n).to(device), n)


def synthetic_vis(n: int) -> Tensor:
    """The modality mask of :func:`paged_request`: an image/video span from 5 % to 90 %."""
    vis = torch.zeros(n, dtype=torch.bool)
    vis[int(0.05 * n) : int(0.9 * n)] = True
    return vis
