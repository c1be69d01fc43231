"""Shared fixtures: the tiny random Qwen2-VL checkpoint, built once per test session."""

from __future__ import annotations

import os
from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    """A tiny random Qwen2-VL (2 layers) built from config classes; no download."""
    from meda_vllm.testing.tiny_qwen2vl import ensure

    cached = os.environ.get("MEDA_TINY_MODEL_DIR")
    out = Path(cached) if cached else tmp_path_factory.mktemp("tiny-qwen2vl")
    return ensure(out, num_layers=2)
