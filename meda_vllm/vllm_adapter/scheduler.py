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

The decision to compress travels to the workers on the ``SchedulerOutput``
(attribute ``meda_compress``: ``{rid: settings dict}``); the kept length comes
back on the ``ModelRunnerOutput`` (attribute ``meda_compressed``:
``{rid: (N, P)}``; ``P = RECOMPUTE`` when compaction failed half way: the scheduler then
preempts the request, which is recomputed uncompressed). Both are plain dataclasses
pickled between processes.
"""

from __future__ import annotations

import inspect
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from meda_vllm.config import KVPolicyConfig
from meda_vllm.vllm_adapter import metrics, settings
from meda_vllm.vllm_adapter.log import logger

ARM_ATTR = "meda_compress"
RESULT_ATTR = "meda_compressed"
#: the kept length a worker reports when a request's pages may be partly rewritten
RECOMPUTE = -1


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


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
    # cumulative counters (read by metrics and tests)
    blocks_freed_total: int = 0
    requests_compressed: int = 0
    skipped: dict[str, int] = field(default_factory=dict)

    def removed(self, rid: str) -> int:
        rec = self.records.get(rid)
        return rec.removed if rec is not None else 0

    def note_skip(self, reason: str) -> None:
        self.skipped[reason] = self.skipped.get(reason, 0) + 1
        metrics.on_skip(reason)


def _translating(method: Callable, state: SchedulerCompression, names: tuple[str, ...]):
    """Wrap a manager method so the named token counts become physical counts."""
    sig = inspect.signature(method)

    def wrapper(*args, **kwargs):
        bound = sig.bind(*args, **kwargs)
        removed = state.removed(bound.arguments.get("request_id"))
        if removed:
            for name in names:
                if name in bound.arguments and bound.arguments[name]:
                    bound.arguments[name] = max(0, bound.arguments[name] - removed)
        return method(*bound.args, **bound.kwargs)

    wrapper.__wrapped__ = method
    return wrapper


def _install_manager_overrides(state: SchedulerCompression) -> None:
    mgr = state.manager
    mgr.get_num_blocks_to_allocate = _translating(
        mgr.get_num_blocks_to_allocate,
        state,
        (
            "num_tokens",
            "total_computed_tokens",
            "num_local_computed_tokens",
            "num_tokens_main_model",
            "prefill_end",
        ),
    )
    mgr.allocate_new_blocks = _translating(
        mgr.allocate_new_blocks, state, ("num_tokens", "num_tokens_main_model")
    )
    mgr.remove_skipped_blocks = _translating(
        mgr.remove_skipped_blocks, state, ("processed_computed_tokens",)
    )
    orig_cache_blocks = mgr.cache_blocks

    def cache_blocks(request, *args, **kwargs):
        # Compacted blocks must never be published under the original token hashes.
        if request.request_id in state.records or request.request_id in state.pending:
            return None
        return orig_cache_blocks(request, *args, **kwargs)

    mgr.cache_blocks = cache_blocks


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
    _install_manager_overrides(state)
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
        state.blocks_freed_total += len(tail)
        state.requests_compressed += 1
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


def patch_scheduler() -> None:
    """Wrap Scheduler.__init__/schedule/update_from_output and KVCacheManager.free."""
    from vllm.v1.core.kv_cache_manager import KVCacheManager
    from vllm.v1.core.sched.scheduler import Scheduler

    if getattr(Scheduler, "_meda_patched", False):
        return
    orig_init = Scheduler.__init__
    orig_schedule = Scheduler.schedule
    orig_update = Scheduler.update_from_output
    orig_free = KVCacheManager.free

    def __init__(self, *args, **kwargs):
        orig_init(self, *args, **kwargs)
        self._meda = attach(self)
        if self._meda is not None:
            self.kv_cache_manager._meda = self._meda

    def schedule(self, *args, **kwargs):
        out = orig_schedule(self, *args, **kwargs)
        state = getattr(self, "_meda", None)
        if state is not None:
            arm(self, state, out)
        return out

    def update_from_output(self, scheduler_output, model_runner_output):
        state = getattr(self, "_meda", None)
        if state is not None:
            commit(self, state, model_runner_output)
        outputs = orig_update(self, scheduler_output, model_runner_output)
        if state is not None and state.recompute:
            recompute_failed(self, state)
        return outputs

    def free(self, request):
        orig_free(self, request)
        state = getattr(self, "_meda", None)
        if state is not None:
            forget(state, request.request_id)

    Scheduler.__init__ = __init__
    Scheduler.schedule = schedule
    Scheduler.update_from_output = update_from_output
    KVCacheManager.free = free
    Scheduler._meda_patched = True
