"""Scheduler side: arm compression on the last prefill chunk, then shrink the request.

Bookkeeping per compressed request ``rid``:

* the request's *logical* length (``Request.num_computed_tokens``, positions,
  ``max_model_len``, stop checks) is never changed;
* ``removed = N - P_g`` (prompt tokens minus the tokens KV cache group ``g`` kept;
  one group unless ``kv_layer_groups`` > 1) turns a logical token count into a
  *physical* one (slots actually held), and every call of group ``g``'s KV manager
  that counts tokens for the request is translated with it;
* each group's block list is truncated to ``cdiv(P_g, block_size)`` blocks and
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
    """What the scheduler knows of one compressed request (per KV cache group)."""

    n_prompt: int
    kept: tuple[int, ...]  # physical length held by each KV cache group
    blocks_before: int  # summed over groups
    blocks_after: int

    def removed(self, group: int) -> int:
        return self.n_prompt - self.kept[group]


@dataclass
class SchedulerCompression:
    """Per-scheduler state, attached as ``scheduler._meda``."""

    server: KVPolicyConfig
    managers: list[Any]  # the full-attention SingleTypeKVCacheManager of each KV cache group
    block_size: int
    records: dict[str, CompressionRecord] = field(default_factory=dict)
    # request ids whose last prefill chunk is in flight (armed, result pending)
    pending: set[str] = field(default_factory=set)
    # request ids whose compaction failed in the worker: preempted after this step's output
    recompute: set[str] = field(default_factory=set)
    stepping: bool = False  # inside update_from_output (note_held runs once at its end)

    @property
    def manager(self) -> Any:  # the first group's (pool size, metrics)
        return self.managers[0]

    def removed(self, rid: str, group: int = 0) -> int:
        rec = self.records.get(rid)
        return rec.removed(group) if rec is not None else 0

    def note_skip(self, reason: str) -> None:
        metrics.on_skip(reason)


def attach(scheduler: Any) -> SchedulerCompression | None:
    """Create the state for a freshly built scheduler (None when compression is off)."""
    server = settings.server_config(scheduler.vllm_config)
    if server.kv_policy == "none":
        return None
    coordinator = scheduler.kv_cache_manager.coordinator
    managers = list(coordinator.single_type_managers)
    from vllm.v1.kv_cache_interface import FullAttentionSpec

    kinds = sorted({type(m.kv_cache_spec).__name__ for m in managers})
    expected = server.kv_layer_groups
    if len(managers) != expected or kinds != [FullAttentionSpec.__name__]:
        raise RuntimeError(
            f"meda-vllm: --kv-policy {server.kv_policy} supports models with full attention "
            f"in every layer ({expected} KV cache group(s), kv_layer_groups); this model has "
            f"{len(managers)} ({', '.join(kinds) or 'none'})"
        )
    sizes = {m.block_size for m in managers}
    if len(sizes) != 1:
        raise RuntimeError(f"meda-vllm: KV cache groups with block sizes {sorted(sizes)}")
    state = SchedulerCompression(server=server, managers=managers, block_size=sizes.pop())
    metrics.on_scheduler_attached(scheduler, state)
    return state


def arm(scheduler: Any, state: SchedulerCompression, out: Any) -> None:
    """After ``schedule()``: pick the requests whose final prefill chunk runs now."""
    armed: list[str] = []
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
        armed.append(rid)
        state.pending.add(rid)
    setattr(out, ARM_ATTR, armed)


def commit(scheduler: Any, state: SchedulerCompression, model_runner_output: Any) -> None:
    """Before ``update_from_output()``: shrink the block lists of compressed requests."""
    results = getattr(model_runner_output, RESULT_ATTR, None) or {}
    for rid in list(state.pending):
        if rid not in results:
            state.pending.discard(rid)  # worker skipped it (e.g. nothing to evict)
    for rid, (n_prompt, kept) in results.items():
        state.pending.discard(rid)
        if kept == RECOMPUTE:
            state.recompute.add(rid)
            continue
        if rid not in scheduler.requests or len(kept) != len(state.managers):
            continue
        before = after = freed = 0
        for mgr, length in zip(state.managers, kept, strict=True):
            blocks = mgr.req_to_blocks.get(rid)
            if blocks is None:
                continue
            keep_blocks = cdiv(length, state.block_size)
            tail = blocks[keep_blocks:]
            before += len(blocks)
            del blocks[keep_blocks:]
            if tail:
                mgr.block_pool.free_blocks(reversed(tail))
            if rid in mgr.num_cached_block:
                mgr.num_cached_block[rid] = min(mgr.num_cached_block[rid], keep_blocks)
            after += len(blocks)
            freed += len(tail)
        state.records[rid] = CompressionRecord(n_prompt, tuple(kept), before, after)
        metrics.on_blocks_freed(state, freed, rid)
        logger.debug(
            "meda-vllm: %s compressed %d -> %s tokens, freed %d blocks",
            rid,
            n_prompt,
            kept,
            freed,
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


def note_held(state: SchedulerCompression) -> None:
    """Publish the blocks each KV cache group holds (after a step, after a free): a few
    list lengths per running request."""
    metrics.on_blocks_held([sum(map(len, m.req_to_blocks.values())) for m in state.managers])


def forget(state: SchedulerCompression, rid: str) -> None:
    if state.records.pop(rid, None) is not None:
        metrics.on_records_changed(state)
    state.pending.discard(rid)
