"""Test-only vLLM plugin: breaks meda-vllm on purpose inside a real `vllm serve`.

Loaded only when a test puts this folder on the server's PYTHONPATH. The fault is read,
for every compressed request, from the file named by ``MEDA_TEST_FAULT_FILE`` (empty or
missing: no fault), so one server serves every fault a test asks for in turn:

* ``kept_index``: compaction moves one evicted token into the slot of a kept one
  (the plan the worker recorded stays right);
* ``slot_shift``: the request's decode slots and sequence length are one token short;
* ``raise_plan`` / ``raise_merge`` / ``raise_compact`` / ``raise_truncate``: an exception
  while planning, while merging, after compaction rewrote the pages (before the row is
  cut), or while the block-table row is cut.
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
    from meda_vllm import compress, paged_view

    orig_apply = worker.apply_plan
    orig_plan = worker.plan_paged_request
    orig_compress = worker.WorkerCompression.compress_request
    orig_merge, orig_paged_merge = compress.merge_evicted, paged_view.paged_merge

    def injected(stage: str) -> None:
        if fault() == f"raise_{stage}":
            raise RuntimeError(f"meda_fault_shim: injected failure in {stage}")

    def plan_paged_request(*args, **kwargs):
        injected("plan")
        return orig_plan(*args, **kwargs)

    def merge_evicted(*args, **kwargs):
        injected("merge")
        return orig_merge(*args, **kwargs)

    def paged_merge(*args, **kwargs):
        injected("merge")
        return orig_paged_merge(*args, **kwargs)

    def apply_plan(caches, layouts, row, plan):
        if fault() == "kept_index":
            target = plan.layer_set if plan.layer_set is not None else plan.layers[0]
            _swap_one_kept(target.kept)
        orig_apply(caches, layouts, row, plan)
        injected("compact")  # after the in-place rewrite: the pages no longer hold the prompt

    def compress_request(self, rid, row_ids, truncate):
        def cut(keep_blocks):
            injected("truncate")
            truncate(keep_blocks)

        orig_compress(self, rid, row_ids, cut)
        if fault() == "slot_shift" and rid in self.removed:
            self.removed[rid] = tuple(r + 1 for r in self.removed[rid])

    worker.apply_plan = apply_plan
    worker.plan_paged_request = plan_paged_request
    compress.merge_evicted = merge_evicted
    paged_view.paged_merge = paged_merge
    worker.WorkerCompression.compress_request = compress_request
