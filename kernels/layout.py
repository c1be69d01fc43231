"""Where K and V of one token live inside a paged KV cache tensor.

vLLM 0.32 gives every attention backend one cache tensor per layer of *logical* shape
``[num_blocks, num_kv_heads, block_size, 2 * head_size]`` (K in the first half of the last
dim, V in the second). The physical order differs between backends: GPU backends may be
NHD-strided (expressible as strides of the logical shape), while the CPU_ATTN ``vec`` path
stores a K page transposed (``[head_size][block_size]``) inside the same bytes, which no
strides of the logical shape can describe. ``PagedKVLayout`` therefore describes the cache
by element offsets into its flat storage:

    address(K[b, h, t, d]) = b*block_stride + h*head_stride + k_offset
                             + t*k_token_stride + d*k_dim_stride
    address(V[b, h, t, d]) = same with v_offset, v_token_stride, v_dim_stride

Offsets count elements from ``cache.data_ptr()`` (the tensor's first element), so a cache
that is a view with a non-zero ``storage_offset`` is handled without extra bookkeeping.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from dataclasses import dataclass

import torch

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
INDEX_DTYPES = (torch.int32, torch.int64)


@dataclass(frozen=True)
class PagedKVLayout:
    block_size: int
    num_kv_heads: int
    head_size: int
    block_stride: int
    head_stride: int
    k_offset: int
    k_token_stride: int
    k_dim_stride: int
    v_offset: int
    v_token_stride: int
    v_dim_stride: int

    def __post_init__(self) -> None:
        for name in ("block_size", "num_kv_heads", "head_size"):
            if getattr(self, name) <= 0:
                raise ValueError(f"PagedKVLayout.{name} must be > 0, got {getattr(self, name)}")
        for name in (
            "block_stride",
            "head_stride",
            "k_offset",
            "k_token_stride",
            "k_dim_stride",
            "v_offset",
            "v_token_stride",
            "v_dim_stride",
        ):
            if getattr(self, name) < 0:
                raise ValueError(
                    f"PagedKVLayout.{name} must be >= 0 (negative strides are not supported), "
                    f"got {getattr(self, name)}"
                )

    # ------------------------------------------------------------------ constructors
    @classmethod
    def from_logical(cls, cache: torch.Tensor) -> PagedKVLayout:
        """Layout of a cache whose ``[nb, H, bs, 2D]`` view is described by its strides."""
        if cache.dim() != 4 or cache.shape[3] % 2 != 0:
            raise ValueError(
                "cache must have logical shape [num_blocks, num_kv_heads, block_size, "
                f"2*head_size], got {tuple(cache.shape)}"
            )
        _, num_kv_heads, block_size, two_d = cache.shape
        head_size = two_d // 2
        s_block, s_head, s_token, s_dim = cache.stride()
        return cls(
            block_size=block_size,
            num_kv_heads=num_kv_heads,
            head_size=head_size,
            block_stride=s_block,
            head_stride=s_head,
            k_offset=0,
            k_token_stride=s_token,
            k_dim_stride=s_dim,
            v_offset=head_size * s_dim,
            v_token_stride=s_token,
            v_dim_stride=s_dim,
        )

    @classmethod
    def cpu_vec(cls, num_kv_heads: int, block_size: int, head_size: int) -> PagedKVLayout:
        """CPU_ATTN ``vec`` path page (contiguous cache): K page ``[D][bs]``, V page ``[bs][D]``."""
        return cls(
            block_size=block_size,
            num_kv_heads=num_kv_heads,
            head_size=head_size,
            block_stride=num_kv_heads * block_size * 2 * head_size,
            head_stride=block_size * 2 * head_size,
            k_offset=0,
            k_token_stride=1,
            k_dim_stride=block_size,
            v_offset=block_size * head_size,
            v_token_stride=head_size,
            v_dim_stride=1,
        )

    # ------------------------------------------------------------------ helpers
    def k_args(self, head_offsets: torch.Tensor) -> tuple:
        """The kernels' K addressing arguments, in their parameter order
        (``head_offsets``: :attr:`LayerSet.head_offsets`)."""
        return (
            self.block_stride,
            head_offsets,
            self.k_offset,
            self.k_token_stride,
            self.k_dim_stride,
        )

    def kv_args(self, head_offsets: torch.Tensor) -> tuple:
        """The kernels' K and V addressing arguments, in their parameter order."""
        return (
            *self.k_args(head_offsets),
            self.v_offset,
            self.v_token_stride,
            self.v_dim_stride,
        )

    def extent(self, num_blocks: int) -> int:
        """Number of elements (from the cache's first element) the layout may touch."""
        if num_blocks == 0:
            return 0
        bs, d = self.block_size - 1, self.head_size - 1
        k_last = self.k_offset + bs * self.k_token_stride + d * self.k_dim_stride
        v_last = self.v_offset + bs * self.v_token_stride + d * self.v_dim_stride
        return (
            (num_blocks - 1) * self.block_stride
            + (self.num_kv_heads - 1) * self.head_stride
            + max(k_last, v_last)
            + 1
        )

    def _view(self, cache: torch.Tensor, offset: int, t_stride: int, d_stride: int):
        shape = (cache.shape[0], self.num_kv_heads, self.block_size, self.head_size)
        strides = (self.block_stride, self.head_stride, t_stride, d_stride)
        return cache.as_strided(shape, strides, cache.storage_offset() + offset)

    def k_view(self, cache: torch.Tensor) -> torch.Tensor:
        """``[num_blocks, H_kv, block_size, D]`` view of the K pages (shares storage)."""
        return self._view(cache, self.k_offset, self.k_token_stride, self.k_dim_stride)

    def v_view(self, cache: torch.Tensor) -> torch.Tensor:
        """``[num_blocks, H_kv, block_size, D]`` view of the V pages (shares storage)."""
        return self._view(cache, self.v_offset, self.v_token_stride, self.v_dim_stride)


# ---------------------------------------------------------------------- layer sets
@dataclass(frozen=True)
class LayerSet:
    """One layer's cache, or several layers' caches of one layout, as the kernels see them:
    one cache of ``num_layers * H_kv`` heads, head ``l * H_kv + h`` being KV head ``h`` of
    ``tensors[l]``. Every op takes a tensor (one layer) or a sequence of tensors (a layer
    set: one launch for all layers, head-major arguments and outputs ``[L * H_kv, ...]``).

    The kernels address a head through :attr:`head_offsets`, the element offset of each
    (layer, head) from the first tensor's first element (``layer`` pointers may lie before
    or after it: one address space), so per-layer caches need not be one allocation.
    """

    tensors: tuple[torch.Tensor, ...]
    layout: PagedKVLayout
    is_layer_set: bool  # given as a sequence: outputs keep a layer axis where one op has one

    @property
    def base(self) -> torch.Tensor:
        return self.tensors[0]

    @property
    def num_layers(self) -> int:
        return len(self.tensors)

    @property
    def num_heads(self) -> int:
        return self.num_layers * self.layout.num_kv_heads

    @property
    def device(self) -> torch.device:
        return self.base.device

    @property
    def head_offsets(self) -> torch.Tensor:
        """int64 ``[num_heads]`` on the cache's device (made once per set of pointers)."""
        return self._head_table[0]

    @property
    def head_align(self) -> int:
        """16 when every head offset is a multiple of 16 elements, else 1 (the kernels'
        ``HEAD_ALIGN``: what the compiler may assume of them)."""
        return self._head_table[1]

    @functools.cached_property
    def _head_table(self) -> tuple[torch.Tensor, int]:  # one lookup per set, not per launch
        ptrs = tuple(t.data_ptr() for t in self.tensors)
        lay = self.layout
        key = ptrs, self.base.element_size(), lay.num_kv_heads, lay.head_stride, str(self.device)
        return _head_offsets(key)

    def split(self, t: torch.Tensor | None) -> list[torch.Tensor | None]:
        """A head-major tensor ``[L * H_kv, ...]`` as ``L`` per-layer ``[H_kv, ...]`` views."""
        if t is None:
            return [None] * self.num_layers
        return list(t.split(self.layout.num_kv_heads, dim=0))


@functools.lru_cache(maxsize=256)
def _head_offsets(key) -> tuple[torch.Tensor, int]:
    # Pointers, not tensors, are the key: a cache is allocated once per server, so on a
    # GPU the host-to-device copy (a synchronisation) happens at the first request only.
    ptrs, elem, h_kv, head_stride, device = key
    offsets = []
    for p in ptrs:
        delta = p - ptrs[0]
        if delta % elem:
            raise ValueError("layer caches must be aligned to their element size")
        offsets.extend(delta // elem + h * head_stride for h in range(h_kv))
    align = 16 if all(o % 16 == 0 for o in offsets) else 1
    return torch.tensor(offsets, dtype=torch.int64, device=device), align


def same_geometry(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Whether two layer caches can be in one :class:`LayerSet` (with the same layout)."""
    return a.dtype == b.dtype and a.device == b.device and a.shape == b.shape


def check_caches(cache: torch.Tensor | Sequence[torch.Tensor], layout: PagedKVLayout) -> LayerSet:
    """Validate one cache tensor or a sequence of them (each one of ``layout``; all of one
    dtype, shape and device) and return their :class:`LayerSet`."""
    is_layer_set = not isinstance(cache, torch.Tensor)
    if is_layer_set:
        if isinstance(cache, (str, bytes)) or not isinstance(cache, Sequence) or not cache:
            raise ValueError("cache must be a torch.Tensor or a non-empty sequence of them")
        tensors = tuple(cache)
    else:
        tensors = (cache,)
    for t in tensors:
        check_cache(t, layout)
    first = tensors[0]
    for t in tensors[1:]:
        if not same_geometry(t, first):
            raise ValueError(
                "the caches of a layer set must share dtype, device and shape "
                f"(got {first.dtype}/{first.device}/{tuple(first.shape)} and "
                f"{t.dtype}/{t.device}/{tuple(t.shape)})"
            )
    return LayerSet(tensors, layout, is_layer_set)


# ---------------------------------------------------------------------- validation
def check_cache(cache: torch.Tensor, layout: PagedKVLayout) -> None:
    if not isinstance(layout, PagedKVLayout):
        raise ValueError(f"layout must be a PagedKVLayout, got {type(layout).__name__}")
    if not isinstance(cache, torch.Tensor):
        raise ValueError("cache must be a torch.Tensor")
    if cache.dtype not in FLOAT_DTYPES:
        raise ValueError(f"cache dtype must be float16/bfloat16/float32, got {cache.dtype}")
    want = (layout.num_kv_heads, layout.block_size, 2 * layout.head_size)
    if cache.dim() != 4 or tuple(cache.shape[1:]) != want:
        raise ValueError(
            f"cache must have logical shape [num_blocks, {want[0]}, {want[1]}, {want[2]}] "
            f"to match the layout, got {tuple(cache.shape)}"
        )
    available = cache.untyped_storage().nbytes() // cache.element_size() - cache.storage_offset()
    need = layout.extent(cache.shape[0])
    if need > available:
        raise ValueError(
            f"layout addresses {need} elements but the cache storage holds only {available} "
            "from the tensor's first element: layout does not fit this cache"
        )


def check_row(row: torch.Tensor, cache: torch.Tensor, layout: PagedKVLayout, n: int) -> None:
    """``row`` is one request's block-table row; it must cover ``n`` tokens."""
    if not isinstance(row, torch.Tensor) or row.dim() != 1 or row.dtype not in INDEX_DTYPES:
        raise ValueError("row must be a 1-D int32/int64 tensor of block ids")
    if row.device != cache.device:
        raise ValueError(f"row is on {row.device} but cache is on {cache.device}")
    if not isinstance(n, int) or n < 0:
        raise ValueError(f"n must be a non-negative int, got {n!r}")
    blocks = -(-n // layout.block_size)
    if row.shape[0] < blocks:
        raise ValueError(
            f"row has {row.shape[0]} block ids but {n} tokens need {blocks} "
            f"(block_size {layout.block_size})"
        )
    if row.device.type == "cpu" and blocks > 0:
        used = row[:blocks]
        if int(used.min()) < 0 or int(used.max()) >= cache.shape[0]:
            raise ValueError(f"row holds block ids outside [0, {cache.shape[0]})")


def check_positions(
    pos: torch.Tensor,
    name: str,
    num_kv_heads: int,
    limit: int,
    device: torch.device,
    ascending: bool = True,
) -> None:
    """``pos`` is ``[H_kv, P]`` integer token positions (strictly ascending if ``ascending``).

    Value checks (range, order) run only for CPU tensors: on CUDA they would synchronise.
    """
    if not isinstance(pos, torch.Tensor) or pos.dim() != 2 or pos.dtype not in INDEX_DTYPES:
        raise ValueError(f"{name} must be a [H_kv, P] int32/int64 tensor")
    if pos.shape[0] != num_kv_heads:
        raise ValueError(f"{name} has {pos.shape[0]} heads, the cache has {num_kv_heads}")
    if pos.device != device:
        raise ValueError(f"{name} is on {pos.device} but cache is on {device}")
    if pos.device.type == "cpu" and pos.numel() > 0:
        if int(pos.min()) < 0 or int(pos.max()) >= limit:
            raise ValueError(f"{name} holds positions outside [0, {limit})")
        if ascending and pos.shape[1] > 1 and not bool((pos[:, 1:] > pos[:, :-1]).all()):
            raise ValueError(f"{name} must be strictly ascending per head")


def check_queries(q: torch.Tensor, q_pos: torch.Tensor, caches: LayerSet, n: int) -> int:
    """Validate ``q [H, R, D]`` / ``q_pos [R]`` (positions in ``[0, n)``, checked on CPU only).

    ``H`` counts the query heads of every layer of the set. Returns the GQA group size
    ``H // (L * H_kv)``.
    """
    layout, cache, num_kv_heads = caches.layout, caches.base, caches.num_heads
    if not isinstance(q, torch.Tensor) or q.dim() != 3 or q.dtype not in FLOAT_DTYPES:
        raise ValueError("q must be a [H, R, D] float16/bfloat16/float32 tensor")
    h, r, d = q.shape
    if d != layout.head_size:
        raise ValueError(f"q head size {d} != cache head size {layout.head_size}")
    if h % num_kv_heads != 0:
        raise ValueError(f"query heads ({h}) must be a multiple of KV heads ({num_kv_heads})")
    if not isinstance(q_pos, torch.Tensor) or q_pos.dim() != 1 or q_pos.dtype not in INDEX_DTYPES:
        raise ValueError("q_pos must be a 1-D int32/int64 tensor")
    if q_pos.shape[0] != r:
        raise ValueError(f"q_pos has {q_pos.shape[0]} entries but q has {r} rows")
    if q.device != cache.device or q_pos.device != cache.device:
        raise ValueError("q, q_pos and cache must be on the same device")
    if (
        q_pos.device.type == "cpu"
        and q_pos.numel() > 0
        and (int(q_pos.min()) < 0 or int(q_pos.max()) >= n)
    ):
        raise ValueError(f"q_pos holds positions outside [0, {n})")
    return h // num_kv_heads
