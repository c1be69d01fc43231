"""Kernel tests: Triton kernels vs torch references vs dense brute force.

On CPU the kernels run in Triton's interpreter, which is chosen when a ``@triton.jit``
function is decorated: ``TRITON_INTERPRET=1`` must be set before ``meda_vllm.kernels``
(and triton) are first imported, hence at the very top of this file.

On a GPU machine, ``MEDA_TEST_REAL_GPU=1 pytest tests/kernels -m gpu`` compiles the
kernels for real instead (the interpreter tests are then skipped).
"""

import os
import sys

REAL_GPU = bool(os.environ.get("MEDA_TEST_REAL_GPU"))
# Triton decides interpreter vs compiler per function at decoration time, for triton's own
# library functions (tl.sum, tl.max, ...) too: so the variable must be set before triton
# is first imported. It is restored afterwards, and set again only while a test of this
# directory runs, so that it does not leak into other test directories or the
# subprocesses (vLLM servers) they start in the same pytest run.
_TRITON_WAS_IMPORTED = "triton" in sys.modules
_PREVIOUS = os.environ.get("TRITON_INTERPRET")
if not REAL_GPU:
    os.environ["TRITON_INTERPRET"] = "1"

from collections.abc import Callable  # noqa: E402
from dataclasses import dataclass  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

from meda_vllm.kernels import PagedKVLayout  # noqa: E402
from meda_vllm.kernels.dispatch import interpreter_ready  # noqa: E402

if _PREVIOUS is None:
    os.environ.pop("TRITON_INTERPRET", None)
else:
    os.environ["TRITON_INTERPRET"] = _PREVIOUS
INTERPRETED = interpreter_ready()


@pytest.fixture(autouse=True)
def _interpreter_env(monkeypatch):
    """Triton also reads TRITON_INTERPRET while running interpreted kernels: set it for
    every test of this directory only."""
    if not REAL_GPU:
        monkeypatch.setenv("TRITON_INTERPRET", "1")


@pytest.fixture(autouse=True)
def _gpu_gate(request):
    on_gpu = request.node.get_closest_marker("gpu") is not None
    if on_gpu and not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    if on_gpu and not REAL_GPU:
        pytest.skip("run with MEDA_TEST_REAL_GPU=1 (compiled kernels, not the interpreter)")
    if REAL_GPU and not on_gpu:
        pytest.skip("interpreter test; MEDA_TEST_REAL_GPU=1 runs only the gpu tests")
    needs_interpreter = getattr(request.module, "NEEDS_INTERPRETER", True)
    if not on_gpu and needs_interpreter and not INTERPRETED:
        pytest.skip(
            "triton was imported before tests/kernels/conftest.py could set "
            f"TRITON_INTERPRET=1 (triton already imported: {_TRITON_WAS_IMPORTED}); "
            "run `pytest tests/kernels` in its own process"
        )


@dataclass
class Paged:
    """A paged cache holding one request's ``n`` tokens in shuffled blocks."""

    cache: torch.Tensor
    layout: PagedKVLayout
    row: torch.Tensor
    n: int
    kind: str
    decode: Callable  # decode(cache, num_tokens) -> (K, V) [H_kv, num_tokens, D] (fp32)

    def dense(self, num_tokens=None):
        return self.decode(self.cache, self.n if num_tokens is None else num_tokens)


def _decoder(kind, layout, row):
    """Read tokens straight from the physical order each kind was built with.

    Independent of ``PagedKVLayout``'s arithmetic, so a wrong layout constructor fails.
    """
    bs, d, h_kv = layout.block_size, layout.head_size, layout.num_kv_heads

    def decode(cache, num_tokens):
        ks, vs = [], []
        for i in range(num_tokens):
            b, t = int(row[i // bs]), i % bs
            if kind == "nhd":
                phys = cache.permute(0, 2, 1, 3)  # back to the allocated [nb, bs, H, 2D]
                ks.append(phys[b, t, :, :d])
                vs.append(phys[b, t, :, d:])
            elif kind == "hnd":
                ks.append(cache[b, :, t, :d])
                vs.append(cache[b, :, t, d:])
            else:  # vec: per head a flat page = K^T [D][bs] then V [bs][D]
                page = cache[b].reshape(h_kv, -1)
                ks.append(page[:, t : d * bs : bs])
                vs.append(page[:, bs * d + t * d : bs * d + (t + 1) * d])
        if not ks:
            empty = torch.zeros((h_kv, 0, d))
            return empty, empty.clone()
        return (
            torch.stack(ks, 1).float(),
            torch.stack(vs, 1).float(),
        )

    return decode


def build_paged(
    kind="nhd",
    dtype=torch.float32,
    num_kv_heads=2,
    head_size=64,
    block_size=16,
    n=37,
    extra_blocks=3,
    row_dtype=None,
    seed=0,
    scale=1.0,
    device="cpu",
) -> Paged:
    gen = torch.Generator().manual_seed(seed)
    used = -(-n // block_size)
    nb = used + extra_blocks
    shape = (nb, num_kv_heads, block_size, 2 * head_size)
    if kind == "nhd":
        phys = torch.randn(nb, block_size, num_kv_heads, 2 * head_size, generator=gen) * scale
        cache = phys.to(dtype).permute(0, 2, 1, 3)
        layout = PagedKVLayout.from_logical(cache)
    elif kind == "hnd":
        # a view with a non-zero storage offset inside a larger buffer
        total = torch.Size(shape).numel()
        buf = torch.randn(total + 11, generator=gen) * scale
        cache = buf.to(dtype)[7 : 7 + total].view(shape)
        layout = PagedKVLayout.from_logical(cache)
    elif kind == "vec":
        cache = (torch.randn(shape, generator=gen) * scale).to(dtype)
        layout = PagedKVLayout.cpu_vec(num_kv_heads, block_size, head_size)
    else:
        raise ValueError(kind)
    if row_dtype is None:  # both index dtypes get exercised by every op's tests
        row_dtype = torch.int64 if kind == "vec" else torch.int32
    perm = torch.randperm(nb, generator=gen)
    row = perm[: max(used, 1) + 1].to(row_dtype)  # shuffled, one spare block id at the end
    cache = cache.to(device)
    row = row.to(device)
    return Paged(cache, layout, row, n, kind, _decoder(kind, layout, row.cpu()))


@pytest.fixture
def paged():
    return build_paged


def build_layout_case(kind, block_size, n, num_kv_heads, **kwargs):
    """The layout/ragged sweeps' request: bf16, head size 80 (masked to 128 lanes)."""
    return build_paged(
        kind=kind,
        dtype=torch.bfloat16,
        head_size=80,
        block_size=block_size,
        n=n,
        num_kv_heads=num_kv_heads,
        **kwargs,
    )


@pytest.fixture
def layout_case():
    return build_layout_case


STORE_TOL = {  # (atol, rtol) for values rounded once into the dtype
    torch.float32: (1e-5, 1e-5),
    torch.float16: (2e-3, 2e-3),
    torch.bfloat16: (2e-2, 1.6e-2),
}


@pytest.fixture
def store_tol():
    return STORE_TOL
