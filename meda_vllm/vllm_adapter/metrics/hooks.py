"""What the scheduler and the worker call when something happens (never raises)."""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from meda_vllm.vllm_adapter.log import logger
from meda_vllm.vllm_adapter.metrics.catalogue import (
    FALLBACK_REASONS,
    SCHEDULER_SKIP_REASONS,
    WORKER_SKIP_REASONS,
)
from meda_vllm.vllm_adapter.metrics.recording import configure, recorder


def _safe(fn: Callable[..., None]) -> Callable[..., None]:
    """Metrics must never take the engine down: log the first failure, then stay quiet."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> None:
        try:
            fn(*args, **kwargs)
        except Exception:  # noqa: BLE001
            if not _FAILED:
                _FAILED.append(fn.__name__)
                logger.exception(
                    "meda-vllm: metrics hook %s failed (metrics may be incomplete)", fn.__name__
                )

    return wrapper


_FAILED: list[str] = []


@dataclass
class _SchedulerContext:
    bytes_per_block: int
    pool_blocks: int


_SCHED: dict[int, _SchedulerContext] = {}


@_safe
def on_scheduler_attached(scheduler: Any, state: Any) -> None:
    """A compressing scheduler was built: settings, pool size, and every series at zero."""
    rec = configure(scheduler.vllm_config)
    group = scheduler.kv_cache_config.kv_cache_groups[0]
    bytes_per_block = int(group.kv_cache_spec.page_size_bytes) * len(group.layer_names)
    pool_blocks = max(int(state.manager.block_pool.num_gpu_blocks) - 1, 1)  # minus null block
    _SCHED[id(state)] = _SchedulerContext(bytes_per_block, pool_blocks)
    cfg = state.server
    rec.info("meda:kv_policy", policy=cfg.kv_policy, budget=cfg.kv_budget, window=cfg.kv_window)
    rec.set("meda:kv_cache_blocks", pool_blocks)
    # Series exist from startup, so rate() sees the first event.
    rec.set("meda:kv_blocks_saved", 0)
    rec.set("meda:kv_cache_saved_perc", 0)
    for name in ("meda:kv_blocks_freed", "meda:kv_bytes_saved"):
        rec.inc(name, 0)
    for name in ("meda:kv_tokens_before", "meda:kv_tokens_after"):
        rec.inc(name, 0)
    for reason in SCHEDULER_SKIP_REASONS + WORKER_SKIP_REASONS:
        rec.inc("meda:requests_skipped", 0, reason=reason)
    for reason in FALLBACK_REASONS:
        rec.inc("meda:requests_fallback", 0, reason=reason)
    rec.inc("meda:requests_compressed", 0, policy=cfg.kv_policy)
    groups = scheduler.kv_cache_config.kv_cache_groups
    for layer in range(sum(len(g.layer_names) for g in groups)):
        rec.inc("meda:layer_kept_tokens", 0, layer=layer)
    for index in range(len(groups)):
        rec.inc("meda:group_kept_tokens", 0, group=index)
        rec.set("meda:group_blocks_held", 0, group=index)
    for name in ("meda:compression_ratio", "meda:compression_seconds"):
        rec.observe(name, math.nan)  # creates the buckets, counts nothing


@_safe
def on_skip(reason: str, vllm_config: Any = None) -> None:
    """A request will not be compressed (scheduler or worker side)."""
    rec = configure(vllm_config) if vllm_config is not None else recorder()
    if rec.base:
        rec.inc("meda:requests_skipped", reason=reason)


@_safe
def on_blocks_freed(state: Any, freed_blocks: int, request_id: str | None = None) -> None:
    """The scheduler returned a compressed request's tail blocks to the pool."""
    ctx = _SCHED.get(id(state))
    if ctx is None:
        return
    rec = recorder()
    rec.inc("meda:kv_blocks_freed", freed_blocks)
    rec.inc("meda:kv_bytes_saved", freed_blocks * ctx.bytes_per_block)
    record = state.records.get(request_id) if request_id is not None else None
    if record is not None:
        rec.note_request(
            request_id,
            blocks_before=record.blocks_before,
            blocks_after=record.blocks_after,
            blocks_freed=freed_blocks,
            bytes_freed=freed_blocks * ctx.bytes_per_block,
        )
    on_records_changed(state)


@_safe
def on_records_changed(state: Any) -> None:
    """The set of live compressed requests changed: update the blocks-saved gauges."""
    ctx = _SCHED.get(id(state))
    if ctx is None:
        return
    saved = sum(r.blocks_before - r.blocks_after for r in state.records.values())
    rec = recorder()
    rec.set("meda:kv_blocks_saved", saved)
    rec.set("meda:kv_cache_saved_perc", saved / ctx.pool_blocks)


@_safe
def on_blocks_held(held: list[int]) -> None:
    """After a scheduler step or a free: the blocks each KV cache group holds now."""
    rec = recorder()
    for index, blocks in enumerate(held):
        rec.set("meda:group_blocks_held", blocks, group=index)


@_safe
def on_compressed(vllm_config: Any, stats: Any, policy: str) -> None:
    """The worker compressed one request (``stats``: worker.CompressionStats)."""
    rec = configure(vllm_config)
    n = max(int(stats.n_prompt), 1)
    rec.inc("meda:requests_compressed", policy=policy)
    if stats.fallback:
        rec.inc("meda:requests_fallback", reason=stats.fallback)
    rec.inc("meda:kv_tokens_before", stats.n_prompt)
    rec.inc("meda:kv_tokens_after", stats.kept)
    rec.observe("meda:compression_ratio", stats.kept / n)
    rec.observe("meda:compression_seconds", stats.seconds)
    for layer, budget in enumerate(stats.layer_budgets):
        rec.set("meda:layer_budget_ratio", budget / n, layer=layer)
        rec.inc("meda:layer_kept_tokens", budget, layer=layer)
    for index, held in enumerate(stats.group_kept):
        rec.inc("meda:group_kept_tokens", held, group=index)
    rec.note_request(
        stats.rid,
        policy=policy,
        prompt_tokens=int(stats.n_prompt),
        kept_tokens=int(stats.kept),
        layer_kept_tokens=[int(b) for b in stats.layer_budgets],
        group_kept_tokens=[int(k) for k in stats.group_kept],
        compression_seconds=float(stats.seconds),
        fallback=stats.fallback,
    )


@_safe
def on_workspace(vllm_config: Any, workspace_bytes: int) -> None:
    """The worker resolved (and reserved) its compression workspace."""
    configure(vllm_config).set("meda:workspace_bytes", workspace_bytes)
