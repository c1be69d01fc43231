"""Unit tests run on small tensors: one intra-op thread avoids oversubscribing the
2-core CI machines (measured: 54 s -> 10 s for the whole suite under load)."""

from __future__ import annotations

import sys
from pathlib import Path

import torch

torch.set_num_threads(1)
sys.path.insert(0, str(Path(__file__).parent))  # for `from _util import ...`
