"""Scheduler side: arm compression on the last prefill chunk, then shrink the request.

Bookkeeping per compressed request ``rid``:

* the request's *logical* length (``Request.num_computed_tokens``, positions,
  ``max_model_len``, stop checks) is never changed;
* ``removed[rid] = N - P`` (prompt tokens minus kept tokens) turns a logical
  token count into a *physical* one (slots actually held), and every call of the
  KV manager that counts tokens for the request is translated with it;
* the request's block list is truncated to ``cdiv(P, block_size)`` blocks and
  the tail blocks go back to the pool the moment the worker reports the step
  that compressed (``update_from_output``), so ``vllm:kv_cache_usage_perc``
  and admission of waiting requests see the freed memory at once.

The decision and the kept lengths travel on vLLM's step messages (``protocol.py``);
the vLLM methods that call into this module are wrapped in ``patches/scheduler.py`` and
``patches/kv_cache_manager.py``.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

from meda_vllm.config import KVPolicyConfig
from meda_vllm.vllm_adapter import metrics, settings
from meda_vllm.vllm_adapter.log import logger
from meda_vllm.vllm_adapter.protocol import ARM_ATTR, RECOMPUTE, RESULT_ATTR, cdiv


@dataclass
class CompressionRecord:
    """What the scheduler knows of one compressed request."""

    n_prompt: int
    kept: int
    blocks_before: int
    blocks_after: int

    @property
    def removed(self) -> int:
        return self.n_prompt - self.kept


@dataclass
class SchedulerCompression:
    """Per-scheduler state, attached as ``scheduler._meda``."""

    server: KVPolicyConfig
    manager: Any  # the full-attention SingleTypeKVCacheManager
    block_size: int
    records: dict[str, CompressionRecord] = field(default_factory=dict)
    # request ids whose last prefill chunk is in flight (armed, result pending)
    pending: set[str] = field(default_factory=set)
    # request ids whose compaction failed in the worker: preempted after this step's output
    recompute: set[str] = field(default_factory=set)

    def removed(self, rid: str) -> int:
        rec = self.records.get(rid)
        return rec.removed if rec is not None else 0

    def note_skip(self, reason: str) -> None:
        metrics.on_skip(reason)


def attach(scheduler: Any) -> SchedulerCompression | None:
    """Create the state for a freshly built scheduler (None when compression is off)."""
    server = settings.server_config(scheduler.vllm_config)
    if server.kv_policy == "none":
        return None
    coordinator = scheduler.kv_cache_manager.coordinator
    managers = coordinator.single_type_managers
    if len(managers) != 1:
        raise RuntimeError(
            f"meda-vllm: --kv-policy {server.kv_policy} supports models with one KV cache "
            f"group (full attention in every layer); this model has {len(managers)}"
        )
    mgr = managers[0]
    from vllm.v1.kv_cache_interface import FullAttentionSpec

    if type(mgr.kv_cache_spec) is not FullAttentionSpec:
        raise RuntimeError(
            f"meda-vllm: --kv-policy {server.kv_policy} needs full attention; this model's KV "
            f"cache spec is {type(mgr.kv_cache_spec).__name__}"
        )
    state = SchedulerCompression(server=server, manager=mgr, block_size=mgr.block_size)
    metrics.on_scheduler_attached(scheduler, state)
    return state


def arm(scheduler: Any, state: SchedulerCompression, out: Any) -> None:
    """After ``schedule()``: pick the requests whose final prefill chunk runs now."""
    armed: dict[str, dict[str, Any]] = {}
    spec = getattr(out, "scheduled_spec_decode_tokens", None) or {}
    for rid in out.num_scheduled_tokens:
        if rid in state.records or rid in state.pending:
            continue
        req = scheduler.requests.get(rid)
        if req is None or req.num_computed_tokens != req.num_prompt_tokens:
            continue  # an earlier prefill chunk, or decoding
        if req.num_output_tokens > 0 or req.num_preemptions > 0:
            state.note_skip("recompute_after_preemption")
            continue  # a resumed request re-prefills uncompressed (documented)
        if spec.get(rid):
            continue
        sp = req.sampling_params
        cfg = settings.request_config(state.server, sp.extra_args if sp is not None else None)
        if cfg.kv_policy == "none":
            state.note_skip("disabled_by_request")
            continue
        if req.num_prompt_tokens <= cfg.budget_tokens(req.num_prompt_tokens):
            state.note_skip("short_prompt")
            continue
        armed[rid] = cfg.model_dump()
        state.pending.add(rid)
    setattr(out, ARM_ATTR, armed)


def commit(scheduler: Any, state: SchedulerCompression, model_runner_output: Any) -> None:
    """Before ``update_from_output()``: shrink the block lists of compressed requests."""
    results = getattr(model_runner_output, RESULT_ATTR, None) or {}
    for rid in list(state.pending):
        if rid not in results:
            state.pending.discard(rid)  # worker skipped it (e.g. nothing to evict)
    mgr = state.manager
    for rid, (n_prompt, kept) in results.items():
        state.pending.discard(rid)
        if kept == RECOMPUTE:
            state.recompute.add(rid)
            continue
        blocks = mgr.req_to_blocks.get(rid)
        if blocks is None or rid not in scheduler.requests:
            continue
        keep_blocks = cdiv(kept, state.block_size)
        tail = blocks[keep_blocks:]
        before = len(blocks)
        del blocks[keep_blocks:]
        if tail:
            mgr.block_pool.free_blocks(reversed(tail))
        if rid in mgr.num_cached_block:
            mgr.num_cached_block[rid] = min(mgr.num_cached_block[rid], keep_blocks)
        state.records[rid] = CompressionRecord(n_prompt, kept, before, keep_blocks)
        metrics.on_blocks_freed(state, len(tail))
        logger.debug(
            "meda-vllm: %s compressed %d -> %d tokens, freed %d blocks",
            rid,
            n_prompt,
            kept,
            len(tail),
        )


def recompute_failed(scheduler: Any, state: SchedulerCompression) -> None:
    """After ``update_from_output()``: preempt the requests whose compaction failed (their
    pages may be half rewritten), as vLLM itself preempts between steps; they are
    recomputed from their tokens, uncompressed (``arm`` skips preempted requests)."""
    from vllm.v1.request import RequestStatus

    for rid in sorted(state.recompute):
        req = scheduler.requests.get(rid)
        if req is None or req.status != RequestStatus.RUNNING or req not in scheduler.running:
            continue  # finished in this step (e.g. max_tokens=1): its blocks are freed
        scheduler.running.remove(req)
        scheduler._preempt_request(req, time.monotonic())
        # resumed in the next step: the runner must get the request's data in full
        getattr(scheduler, "prev_step_scheduled_req_ids", set()).discard(rid)
        logger.warning("meda-vllm: %s preempted for recompute after a failed compaction", rid)
    state.recompute.clear()


def forget(state: SchedulerCompression, rid: str) -> None:
    if state.records.pop(rid, None) is not None:
        metrics.on_records_changed(state)
    state.pending.discard(rid)
