"""``vllm.v1.worker.gpu.model_runner.GPUModelRunner`` (Model Runner V2: the GPU default,
also vLLM's CPU V2 runner): ``add_requests``, ``finish_requests``, ``prepare_attn``,
``execute_model``, ``sample_tokens`` (its ``initialize_kv_cache``:
``patches/initialize_kv_cache.py``; its ``model_state``: ``patches/model_state.py``).

Why: as for V1 (``patches/v1_runner.py``): physical slot mappings and ``seq_lens`` for
compressed requests, logical RoPE positions, query rows captured during the prefill,
compression after the forward of the last prefill chunk. V2 keeps no per-request Python
state to read later, and its block tables live in device buffers written through staged
writes.

How:
- ``add_requests``, before the original: note each new request (``WorkerCompression.
  register``); V2 sends a request resumed after preemption as a new one: it gets no
  query-row capture buffer (it is never compressed).
- ``finish_requests``, before the original: forget finished (aborted too) and preempted
  requests, capture buffers included; remember the preempted ones until they finish.
- ``prepare_attn``: for a batch with a compressed request, gathers the block tables and
  computes the slot mappings itself from ``positions - removed``, per KV cache group
  (``kv_layer_groups``: each group keeps its own length); sets the removed tokens for
  ``patches/model_state.py`` (group 0's ``seq_lens``) and the later groups' differences
  for ``patches/group_metadata.py``; tells the attention wrappers which rows to keep.
- ``execute_model``: marks real (non-dummy) steps; after the forward compresses the armed
  requests and cuts each one's block-table row of every group by its length only
  (``BlockTables.num_blocks.np[g, idx] = K_g``, the host copy that the next
  ``apply_staged_writes`` publishes), never a staged write: the next step frees and
  reuses rows before applying staged writes, and a GPU applies them in no order
  (docs/INTEGRATION.md, "V2 block-table row").
- ``sample_tokens``: reports ``{rid: (N, kept)}`` on the ``model_runner_output`` of the
  ``AsyncOutput`` V2 returns.

Remove when: vLLM supports shrinking a request's KV natively.
"""

from __future__ import annotations

from typing import Any


def _offsets(state: Any, input_batch: Any) -> Any:
    """Removed tokens per KV cache group and batch row (a host ``[G, num_reqs]`` tensor), or
    None when no row is compressed."""
    import torch

    if not state.removed:
        return None
    req_ids = input_batch.req_ids[: input_batch.num_reqs]
    off = [[state.removed_in(rid, g) for rid in req_ids] for g in range(state.num_groups)]
    if not any(any(o) for o in off):
        return None
    return torch.tensor(off, dtype=torch.int64)


def _seq_deltas(off: Any, device: Any) -> dict[int, Any] | None:
    """What each later group's attention metadata adds to group 0's physical ``seq_lens``
    (``patches/group_metadata.py``): group 0's removed tokens minus the group's."""
    deltas = {}
    for group in range(1, off.shape[0]):
        delta = off[0] - off[group]
        if delta.any():
            deltas[group] = (delta.to(device), delta)  # for seq_lens, for the host bound
    return deltas or None


def _compress(runner: Any, state: Any, rid: str) -> None:
    idx = runner.req_states.req_id_to_index.get(rid)
    if idx is None:
        return
    tables = runner.block_tables
    groups = range(len(tables.block_tables))
    row_ids = [
        tables.block_tables[g].gpu[idx, : int(tables.num_blocks.np[g, idx])].tolist()
        for g in groups
    ]

    def truncate(keep_blocks: list[int]) -> None:
        # Cut the row's length only; its first keep_blocks ids are already the kept ones.
        # No staged write: the next step runs finish/add_requests before applying staged
        # writes, so one for this row could meet the staged write of a new request that
        # reuses the freed row, and a GPU applies staged writes in no order (silent
        # cross-request KV corruption). num_blocks.np is the host source of truth; the
        # next step's apply_staged_writes() copies it whole into the next UVA buffer of
        # its round-robin pool (never the one an in-flight step reads), and a request
        # added to this row then sets it again later, in program order.
        for g, keep in zip(groups, keep_blocks, strict=True):
            tables.num_blocks.np[g, idx] = keep

    state.compress_request(rid, row_ids, truncate)


def apply() -> None:
    import numpy as np
    import torch
    from vllm.v1.worker.gpu.model_runner import GPUModelRunner

    from meda_vllm.vllm_adapter import capture, runner
    from meda_vllm.vllm_adapter.patches.initialize_kv_cache import set_up
    from meda_vllm.vllm_adapter.patches.model_state import wrap_model_state

    if getattr(GPUModelRunner, "_meda_patched", False):
        return
    orig_add = GPUModelRunner.add_requests
    orig_finish = GPUModelRunner.finish_requests
    orig_prepare_attn = GPUModelRunner.prepare_attn
    orig_execute = GPUModelRunner.execute_model
    orig_sample = GPUModelRunner.sample_tokens

    def finish_requests(self, scheduler_output):
        state = runner.state_of(self)
        if state is not None:
            runner.forget_gone(state, scheduler_output)
        return orig_finish(self, scheduler_output)

    def add_requests(self, scheduler_output):
        state = runner.state_of(self)
        if state is not None:
            state.register(scheduler_output.scheduled_new_reqs)
        return orig_add(self, scheduler_output)

    def prepare_attn(self, input_batch):
        state = runner.state_of(self)
        if state is None or not getattr(self, "_meda_real_step", False):
            return orig_prepare_attn(self, input_batch)
        if not state.ready:  # fallback: initialize_kv_cache normally set it up
            set_up(self, state)
            wrap_model_state(self)
        off = _offsets(state, input_batch)
        n = input_batch.num_reqs
        step = state.plan_capture(
            list(input_batch.req_ids[:n]),
            input_batch.query_start_loc_np[: n + 1],
            self.req_states.num_computed_tokens_np[input_batch.idx_mapping_np[:n]],
            np.diff(input_batch.query_start_loc_np[: n + 1]),
        )
        capture.set_step(step)
        self._meda_offsets = off[0] if off is not None else None  # model_state's seq_lens
        device = input_batch.positions.device
        self._meda_seq_deltas = _seq_deltas(off, device) if off is not None else None
        if off is None:
            return orig_prepare_attn(self, input_batch)
        block_tables = self.block_tables.gather_block_tables(
            input_batch.idx_mapping, num_reqs_padded=input_batch.num_reqs_after_padding
        )
        qsl = input_batch.query_start_loc_np[: n + 1]
        per_req = torch.from_numpy(np.diff(qsl)).long()

        def slots(group_off, out=None):  # every group's slots at positions - group_off
            per_token = torch.repeat_interleave(group_off, per_req)
            positions = input_batch.positions.clone()
            positions[: per_token.numel()] -= per_token.to(positions.device, positions.dtype)
            return self.block_tables.compute_slot_mappings(
                input_batch.idx_mapping,
                input_batch.query_start_loc,
                positions,
                num_tokens_padded=input_batch.num_tokens_after_padding,
                out=out,
            )

        slot_mappings = slots(off[0])  # vLLM's own buffer, as the unpatched step
        scratch = None
        for group in range(1, off.shape[0]):  # a group that keeps another length
            if torch.equal(off[group], off[0]):
                continue
            if scratch is None:
                scratch = torch.empty_like(self.block_tables.slot_mappings)
            slot_mappings[group].copy_(slots(off[group], scratch)[group])
        return block_tables, slot_mappings

    def execute_model(self, scheduler_output, *args, **kwargs):
        dummy = kwargs.get("dummy_run", False) or (len(args) > 1 and args[1])
        self._meda_real_step = not dummy
        try:
            out = orig_execute(self, scheduler_output, *args, **kwargs)
        finally:
            self._meda_real_step = False
            self._meda_offsets = self._meda_seq_deltas = None
            capture.set_step(None)
        if dummy:
            return out
        return runner.after_forward(self, scheduler_output, out, _compress)

    def sample_tokens(self, *args, **kwargs):
        return runner.report_results(self, orig_sample(self, *args, **kwargs))

    GPUModelRunner.finish_requests = finish_requests
    GPUModelRunner.add_requests = add_requests
    GPUModelRunner.prepare_attn = prepare_attn
    GPUModelRunner.execute_model = execute_model
    GPUModelRunner.sample_tokens = sample_tokens
    GPUModelRunner._meda_patched = True
