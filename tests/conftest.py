"""Shared fixtures: the tiny random Qwen2-VL checkpoint, built once per test session.

Also: Triton picks interpreter or compiler for each ``@triton.jit`` function (its own
``tl.*`` library included) when it is decorated, i.e. at import. Other test folders import
vLLM, which imports Triton; so import Triton and our kernels here, first, with
``TRITON_INTERPRET=1``, and restore the environment at once so it does not leak into the
vLLM servers the end-to-end tests start (tests/kernels/conftest.py sets it again for its
own tests only). ``MEDA_TEST_REAL_GPU=1`` compiles them for a real GPU instead.
"""

from __future__ import annotations

import os
from pathlib import Path

if not os.environ.get("MEDA_TEST_REAL_GPU"):
    _previous = os.environ.get("TRITON_INTERPRET")
    os.environ["TRITON_INTERPRET"] = "1"
    try:
        import meda_vllm.kernels  # noqa: F401
    finally:
        if _previous is None:
            os.environ.pop("TRITON_INTERPRET", None)
        else:
            os.environ["TRITON_INTERPRET"] = _previous

import pytest  # noqa: E402


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    """A tiny random Qwen2-VL (2 layers) built from config classes; no download."""
    from meda_vllm.testing.tiny_qwen2vl import ensure

    cached = os.environ.get("MEDA_TINY_MODEL_DIR")
    out = Path(cached) if cached else tmp_path_factory.mktemp("tiny-qwen2vl")
    return ensure(out, num_layers=2)


@pytest.fixture(scope="session")
def sharp_model_dir(tmp_path_factory) -> Path:
    """The tiny Qwen2-VL with 4 layers of different attention sharpness (scaled queries),
    for the reference-oracle tests: kept sets and positions show in its logprobs."""
    from meda_vllm.testing.tiny_qwen2vl import ensure
    from tests.oracle.check import SHARP_Q_SCALES

    cached = os.environ.get("MEDA_TINY_MODEL_DIR")
    out = Path(cached + "-sharp") if cached else tmp_path_factory.mktemp("tiny-qwen2vl-sharp")
    return ensure(out, num_layers=len(SHARP_Q_SCALES), q_scales=SHARP_Q_SCALES)


@pytest.fixture(scope="session")
def oracle(sharp_model_dir):
    """The reference decoder (HF transformers) on the sharp model's weights."""
    from tests.oracle.reference import Oracle

    return Oracle(sharp_model_dir)
