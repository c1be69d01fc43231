"""Debug mode: write what the worker kept for each compressed request.

``MEDA_VLLM_PLAN_DUMP=DIR`` makes the worker save, for every request it compresses, one
``DIR/<request id>.pt`` (``torch.save`` of a dict): the prompt token ids, the modality
mask, the settings, the per-layer budgets and the kept prompt positions of every layer
and KV head. A reference decoder can then check both the kept sets and what the server
decodes from them (``tests/oracle``). Unset (the default), nothing is recorded.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any

import torch

ENV = "MEDA_VLLM_PLAN_DUMP"


def directory() -> Path | None:
    path = os.environ.get(ENV)
    return Path(path) if path else None


def write(rid: str, record: dict[str, Any]) -> None:
    """Save one request's record atomically (readers never see a partial file)."""
    out = directory()
    if out is None:
        return
    out.mkdir(parents=True, exist_ok=True)
    name = re.sub(r"[^A-Za-z0-9_.-]", "_", rid)
    tmp = out / f".{name}.{os.getpid()}.tmp"
    torch.save(record, tmp)
    tmp.replace(out / f"{name}.pt")
