"""``vllm.v1.worker.gpu_model_runner.GPUModelRunner`` (Model Runner V1; the CPU runner
subclasses it): ``_update_states``, ``_prepare_inputs``, ``execute_model``,
``sample_tokens`` (its ``initialize_kv_cache``: ``patches/initialize_kv_cache.py``).

Why: a compressed request holds its kept tokens in its leading slots, so from the step
after compression its slot mapping and ``seq_lens`` must be physical while RoPE positions
stay logical; compression itself needs the post-RoPE query rows of the prompt (captured in
the attention layers, ``patches/attention.py``) and runs right after the forward of the
last prefill chunk, in place in the pages.

How:
- ``_update_states``, before the original: forget finished, preempted and resumed
  requests (capture buffers too); note new requests' prompt length, modality mask (from
  ``mm_features`` placeholder ranges) and settings (``WorkerCompression.register``).
- ``_prepare_inputs``, after the original: for compressed requests, the slot mapping
  recomputed from ``positions - removed`` and ``removed`` subtracted from ``seq_lens`` /
  ``optimistic_seq_lens_cpu``; tells the attention wrappers which query rows to keep.
- ``execute_model``, after the original: compress the armed requests
  (``WorkerCompression.compress_request``) and truncate their block-table rows.
- ``sample_tokens``, after the original: report ``{rid: (N, kept)}`` on the
  ``ModelRunnerOutput`` (``runner.report_results``).

Remove when: vLLM supports shrinking a request's KV natively.
"""

from __future__ import annotations

from typing import Any


def _apply_physical(runner: Any, state: Any, num_reqs: int, total: int) -> None:
    """Slot mapping and seq_lens of compressed requests in physical terms (per group)."""
    import torch

    runner._meda_seq_deltas = None
    req_ids = runner.input_batch.req_ids[:num_reqs]
    off = [[state.removed_in(rid, g) for rid in req_ids] for g in range(state.num_groups)]
    if not any(any(o) for o in off):
        return
    device = runner.seq_lens.device
    req_indices = runner.req_indices.gpu[:total]
    qsl = runner.query_start_loc.gpu[: num_reqs + 1]
    tables = runner.input_batch.block_table
    for group, group_off in enumerate(off):
        off_dev = torch.tensor(group_off, dtype=torch.int64).to(device)
        positions = runner.positions[:total] - off_dev[req_indices]
        tables[group].compute_slot_mapping(num_reqs, qsl, positions)
    # seq_lens in place by group 0's removed tokens; the other groups' metadata builds
    # add the difference (patches/group_metadata.py)
    off_cpu = torch.tensor(off[0], dtype=torch.int64)
    runner.seq_lens[:num_reqs] -= off_cpu.to(device, runner.seq_lens.dtype)
    runner.optimistic_seq_lens_cpu[:num_reqs] -= off_cpu.to(runner.optimistic_seq_lens_cpu.dtype)
    deltas = {}
    for group in range(1, state.num_groups):
        delta = torch.tensor([a - b for a, b in zip(off[0], off[group], strict=True)])
        if delta.any():
            deltas[group] = (delta.to(device), delta)
    runner._meda_seq_deltas = deltas or None


def _compress(runner: Any, state: Any, rid: str) -> None:
    req = runner.requests.get(rid)
    if req is None:
        return
    rows = req.block_ids  # one list of block ids per KV cache group

    def truncate(keep_blocks: list[int]) -> None:
        for ids, keep in zip(rows, keep_blocks, strict=True):
            del ids[keep:]  # in place: later appends extend these lists
        index = runner.input_batch.req_id_to_index.get(rid)
        if index is not None:
            runner.input_batch.block_table.add_row(req.block_ids, index)

    state.compress_request(rid, [list(ids) for ids in rows], truncate)


def apply() -> None:
    import numpy as np
    from vllm.v1.worker.gpu_model_runner import GPUModelRunner

    from meda_vllm.vllm_adapter import capture, runner
    from meda_vllm.vllm_adapter.patches.group_metadata import wrap_group_metadata
    from meda_vllm.vllm_adapter.patches.initialize_kv_cache import set_up

    if getattr(GPUModelRunner, "_meda_patched", False):
        return
    orig_update = GPUModelRunner._update_states
    orig_prepare = GPUModelRunner._prepare_inputs
    orig_execute = GPUModelRunner.execute_model
    orig_sample = GPUModelRunner.sample_tokens

    def _update_states(self, scheduler_output):
        state = runner.state_of(self)
        if state is not None:
            runner.forget_gone(state, scheduler_output)
            state.register(scheduler_output.scheduled_new_reqs)
        return orig_update(self, scheduler_output)

    def _prepare_inputs(self, scheduler_output, num_scheduled_tokens):
        result = orig_prepare(self, scheduler_output, num_scheduled_tokens)
        state = runner.state_of(self)
        if state is None:
            return result
        if not state.ready:  # fallback: initialize_kv_cache normally set it up
            set_up(self, state)
            wrap_group_metadata(self)
        num_reqs = self.input_batch.num_reqs
        _apply_physical(self, state, num_reqs, scheduler_output.total_num_scheduled_tokens)
        step = state.plan_capture(
            list(self.input_batch.req_ids[:num_reqs]),
            self.query_start_loc.np[: num_reqs + 1],
            self.input_batch.num_computed_tokens_cpu[:num_reqs],
            np.asarray(num_scheduled_tokens),
        )
        capture.set_step(step)
        return result

    def execute_model(self, scheduler_output, *args, **kwargs):
        try:
            out = orig_execute(self, scheduler_output, *args, **kwargs)
        finally:
            capture.set_step(None)
            self._meda_seq_deltas = None  # never seen by a later dummy run's metadata
        return runner.after_forward(self, scheduler_output, out, _compress)

    def sample_tokens(self, *args, **kwargs):
        return runner.report_results(self, orig_sample(self, *args, **kwargs))

    GPUModelRunner._update_states = _update_states
    GPUModelRunner._prepare_inputs = _prepare_inputs
    GPUModelRunner.execute_model = execute_model
    GPUModelRunner.sample_tokens = sample_tokens
    GPUModelRunner._meda_patched = True
