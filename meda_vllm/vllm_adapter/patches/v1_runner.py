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
    """Slot mapping and seq_lens of compressed requests in physical terms."""
    import torch

    req_ids = runner.input_batch.req_ids[:num_reqs]
    off = [state.removed.get(rid, 0) for rid in req_ids]
    if not any(off):
        return
    off_cpu = torch.tensor(off, dtype=torch.int64)
    off_dev = off_cpu.to(runner.seq_lens.device)
    req_indices = runner.req_indices.gpu[:total]
    positions = runner.positions[:total] - off_dev[req_indices]
    runner.input_batch.block_table.compute_slot_mapping(
        num_reqs, runner.query_start_loc.gpu[: num_reqs + 1], positions
    )
    runner.seq_lens[:num_reqs] -= off_dev.to(runner.seq_lens.dtype)
    runner.optimistic_seq_lens_cpu[:num_reqs] -= off_cpu.to(runner.optimistic_seq_lens_cpu.dtype)


def _compress(runner: Any, state: Any, rid: str, cfg: dict[str, Any]) -> None:
    req = runner.requests.get(rid)
    if req is None:
        return
    row_ids = req.block_ids[0]

    def truncate(keep_blocks: int) -> None:
        del row_ids[keep_blocks:]  # in place: later appends extend this list
        index = runner.input_batch.req_id_to_index.get(rid)
        if index is not None:
            runner.input_batch.block_table.add_row(req.block_ids, index)

    state.compress_request(rid, cfg, list(row_ids), truncate)


def apply() -> None:
    import numpy as np
    from vllm.v1.worker.gpu_model_runner import GPUModelRunner

    from meda_vllm.vllm_adapter import capture, runner
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
        return runner.after_forward(self, scheduler_output, out, _compress)

    def sample_tokens(self, *args, **kwargs):
        return runner.report_results(self, orig_sample(self, *args, **kwargs))

    GPUModelRunner._update_states = _update_states
    GPUModelRunner._prepare_inputs = _prepare_inputs
    GPUModelRunner.execute_model = execute_model
    GPUModelRunner.sample_tokens = sample_tokens
    GPUModelRunner._meda_patched = True
