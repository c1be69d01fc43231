"""Where each token's K and V live inside a vLLM KV page, per backend.

GPU backends (FLASH_ATTN, FLASHINFER, TRITON_ATTN) in vLLM 0.32 declare each
layer's cache as ``[num_blocks, H_kv, block_size, 2 * D]`` (K first, V second)
and their kernels index that logical view through its strides, whatever the
physical order: ``PagedKVLayout.from_logical`` reads the strides.

CPU_ATTN declares the same shape but lays a page out in an ISA-specific way
(``vec``: K transposed ``[D][block_size]``, V ``[block_size][D]``). Rather than
hard-code each ISA, ``probe_cpu_layout`` writes marker tokens with the backend's
own write op into a scratch page, reads where they landed, and fits strides;
an ISA whose page is not strided (e.g. tiled AMX) fails at startup.
"""

from __future__ import annotations

import torch

from meda_vllm.kernels.layout import PagedKVLayout


class UnsupportedLayoutError(RuntimeError):
    pass


def probe_cpu_layout(cache: torch.Tensor, isa: str) -> PagedKVLayout:
    """Fit a PagedKVLayout to CPU_ATTN's page interior for this cache's dtype and ISA."""
    from vllm import _custom_ops as ops

    _, heads, block_size, two_d = cache.shape
    head_size = two_d // 2
    dtype = cache.dtype
    if dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise UnsupportedLayoutError(
            f"meda-vllm: KV compression does not support a {dtype} KV cache on CPU"
        )
    slots = torch.arange(block_size, dtype=torch.long)
    t = torch.arange(block_size, dtype=torch.float32).view(block_size, 1, 1)
    h = torch.arange(heads, dtype=torch.float32).view(1, heads, 1)
    d = torch.arange(head_size, dtype=torch.float32).view(1, 1, head_size)
    shape = (block_size, heads, head_size)

    def write(key: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
        scratch = torch.zeros((1, heads, block_size, two_d), dtype=dtype)
        kc, vc = scratch.view(1, heads, block_size * 2, head_size).chunk(2, dim=2)
        ops.cpu_attn_reshape_and_cache(
            key.to(dtype).contiguous(), value.to(dtype).contiguous(), kc, vc, slots, isa
        )
        return scratch.reshape(-1).float()

    zeros = torch.zeros(shape)
    # Markers are small integers (exact in bf16): 1 + token, 1 + head, 1 + dim.
    fitted = {}
    for which in ("k", "v"):
        coords = []
        for marker in (t, h, d):
            vals = (1 + marker).expand(shape)
            flat = write(vals, zeros) if which == "k" else write(zeros, vals)
            coords.append(flat)
        mask = coords[0] > 0
        if int(mask.sum()) != block_size * heads * head_size:
            raise UnsupportedLayoutError(f"meda-vllm: cannot read CPU_ATTN page layout ({isa})")
        idx = torch.nonzero(mask).squeeze(1)
        tt, hh, dd = (c[idx].long() - 1 for c in coords)
        pos = {}
        for name, axis in (("token", tt), ("head", hh), ("dim", dd)):
            sel_other = [a for a in (tt, hh, dd) if a is not axis]
            base = (sel_other[0] == 0) & (sel_other[1] == 0)
            order = torch.argsort(axis[base])
            offs = idx[base][order]
            pos[name] = int(offs[1] - offs[0]) if offs.numel() > 1 else 0
            pos["origin"] = int(offs[0])
        fitted[which] = pos
        predicted = pos["origin"] + tt * pos["token"] + hh * pos["head"] + dd * pos["dim"]
        if not torch.equal(predicted, idx):
            raise UnsupportedLayoutError(
                f"meda-vllm: CPU_ATTN page layout for isa={isa!r}, {dtype} is not strided; "
                "KV compression is not supported with it"
            )
    k, v = fitted["k"], fitted["v"]
    head_stride = k["head"] if heads > 1 else block_size * two_d
    if heads > 1 and v["head"] != head_stride:
        raise UnsupportedLayoutError("meda-vllm: CPU_ATTN K and V pages disagree on head stride")
    if list(cache.stride()) != list(torch.empty(cache.shape).stride()):
        raise UnsupportedLayoutError("meda-vllm: CPU_ATTN cache tensor is not contiguous")
    return PagedKVLayout(
        block_size=block_size,
        num_kv_heads=heads,
        head_size=head_size,
        block_stride=heads * block_size * two_d,
        head_stride=head_stride,
        k_offset=k["origin"],
        k_token_stride=k["token"],
        k_dim_stride=k["dim"],
        v_offset=v["origin"],
        v_token_stride=v["token"],
        v_dim_stride=v["dim"],
    )


def layout_for(layer: object, cache: torch.Tensor) -> PagedKVLayout:
    """The page layout of one attention layer's cache."""
    if cache.dim() != 4 or cache.shape[-1] % 2:
        raise UnsupportedLayoutError(
            f"meda-vllm: unsupported KV cache shape {tuple(cache.shape)} "
            "(expected [num_blocks, H_kv, block_size, 2 * head_size])"
        )
    backend = type(getattr(layer, "impl", None)).__name__
    if backend == "CPUAttentionBackendImpl":
        return probe_cpu_layout(cache, layer.isa)
    return PagedKVLayout.from_logical(cache)
