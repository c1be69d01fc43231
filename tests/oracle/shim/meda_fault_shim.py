"""Test-only vLLM plugin: breaks meda-vllm on purpose inside a real `vllm serve`.

Loaded only when a test puts this folder on the server's PYTHONPATH. The fault is read,
for every compressed request, from the file named by ``MEDA_TEST_FAULT_FILE`` (empty or
missing: no fault), so one server serves every fault a test asks for in turn:

* ``kept_index``: compaction moves one evicted token into the slot of a kept one
  (the plan the worker recorded stays right);
* ``slot_shift``: the request's decode slots and sequence length are one token short.
"""

from __future__ import annotations

import os
from pathlib import Path

ENV = "MEDA_TEST_FAULT_FILE"


def fault() -> str:
    path = os.environ.get(ENV)
    try:
        return Path(path).read_text().strip() if path else ""
    except OSError:
        return ""


def _swap_one_kept(kept):
    """Replace the middle kept position of the first head with the first evicted one."""
    import torch

    row = kept[0]
    present = torch.zeros(int(row.max()) + 2, dtype=torch.bool)
    present[row] = True
    evicted = int(torch.nonzero(~present)[0])
    mid = row.numel() // 2
    new = row.clone()
    new[mid] = evicted
    kept[0] = torch.sort(new).values


def register() -> None:
    from meda_vllm.vllm_adapter import worker

    if getattr(worker, "_fault_shim", False):
        return
    worker._fault_shim = True
    orig_apply = worker.apply_plan
    orig_compress = worker.WorkerCompression.compress_request

    def apply_plan(caches, layouts, row, plan):
        if fault() == "kept_index":
            target = plan.stacked if plan.stacked is not None else plan.layers[0]
            _swap_one_kept(target.kept)
        return orig_apply(caches, layouts, row, plan)

    def compress_request(self, rid, *args, **kwargs):
        orig_compress(self, rid, *args, **kwargs)
        if fault() == "slot_shift" and rid in self.removed:
            self.removed[rid] += 1

    worker.apply_plan = apply_plan
    worker.WorkerCompression.compress_request = compress_request
