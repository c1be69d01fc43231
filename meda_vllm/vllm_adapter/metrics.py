"""``meda:`` Prometheus metrics on the API server's ``/metrics``, beside vLLM's ``vllm:`` ones.

Where the numbers come from: the scheduler (EngineCore process) frees the pages
and decides what is skipped; the worker process compresses (latency, per-layer
budgets, fallbacks, kept tokens). ``/metrics`` is served by the API server, a third
process. How they get there:

* Every process that produces numbers keeps them in a ``Recorder`` (plain dicts:
  counters, gauges, histogram buckets) and a daemon thread writes them, at most
  every ``FLUSH_SECONDS`` and only after a change, as one JSON snapshot
  ``<dir>/p<pid>.json`` (write to a temporary file, then ``os.replace``: a reader
  sees the old or the new file, never half of one). One compression is a few
  dict updates on the hot path; no file I/O happens in the scheduler's step.
* ``<dir>`` is the environment variable ``MEDA_VLLM_METRICS_DIR``. ``register()``
  (the ``vllm.general_plugins`` entry point, which vLLM runs in every process)
  calls ``init_process()``: a top-level process (``vllm serve``, a script; not a
  ``multiprocessing`` child) sets a fresh, per-run path and removes the folder at
  exit; vLLM's EngineCore, worker and extra API-server processes are
  ``multiprocessing`` children started after that and inherit the variable. A
  ``vllm serve`` started from a process that already had it set (a test runner)
  is top-level again and takes a fresh one, so servers never share numbers.
* In the API server, ``MedaCollector`` (a prometheus_client custom collector)
  reads the snapshots at scrape time and sums them: counters and histograms add
  up over processes; each gauge and info series has one producer. It is added to
  the registry that vLLM's ``/metrics`` route serves, whichever that is (the
  global ``REGISTRY`` or vLLM's multiprocess registry with ``--api-server-count``
  > 1), by wrapping ``get_prometheus_registry`` as the route module sees it
  (PATCHES.md, the ``get_prometheus_registry`` row).

Why not the alternatives: prometheus_client's own multiprocess mode picks its
value class when ``prometheus_client`` is first imported, from
``PROMETHEUS_MULTIPROC_DIR``; vLLM sets that variable only for several API
servers, and turning it on for one server changes how every ``vllm:`` metric is
collected. vLLM's stat-logger plugins run in the API server, but the
``SchedulerStats`` they receive is a msgspec-encoded dataclass with fixed
fields, so scheduler-side numbers cannot ride along without patching vLLM's wire
format. A snapshot per process keeps vLLM's metrics untouched.

Labels: ``model_name`` (vLLM's ``served_model_name``) and ``engine`` (the data
parallel rank) on every series, as on vLLM's own; plus ``reason`` on
skipped/fallback counters, ``layer`` on per-layer series and ``policy`` on
``meda:requests_compressed_total``. ``METRICS`` below is the one list of what is
exposed (tests check the dashboard against ``exposed_names()``).
"""

from __future__ import annotations

import atexit
import contextlib
import functools
import json
import math
import multiprocessing
import os
import shutil
import tempfile
import threading
import time
import uuid
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from meda_vllm.vllm_adapter.log import logger

ENV_DIR = "MEDA_VLLM_METRICS_DIR"
FLUSH_SECONDS = 0.2
BASE_LABELS = ("model_name", "engine")


@dataclass(frozen=True)
class MetricDef:
    """One ``meda:`` metric. ``name`` is the family name (counters get ``_total``)."""

    name: str
    kind: str  # "counter" | "gauge" | "histogram" | "info"
    help: str
    labels: tuple[str, ...] = ()
    buckets: tuple[float, ...] = ()

    @property
    def labelnames(self) -> tuple[str, ...]:
        return BASE_LABELS + self.labels

    def sample_names(self) -> tuple[str, ...]:
        """Names of the samples this family puts on /metrics."""
        if self.kind == "counter":
            return (f"{self.name}_total",)
        if self.kind == "histogram":
            return tuple(f"{self.name}{s}" for s in ("_bucket", "_sum", "_count"))
        if self.kind == "info":
            return (f"{self.name}_info",)
        return (self.name,)


RATIO_BUCKETS = (0.05, 0.1, 0.15, 0.2, 0.25, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0)
SECONDS_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)

#: Skip reasons. Scheduler: decided before the last prefill chunk runs; worker: after it.
SCHEDULER_SKIP_REASONS = ("short_prompt", "disabled_by_request", "recompute_after_preemption")
WORKER_SKIP_REASONS = ("nothing_to_evict", "query_rows_missing", "error", "workspace")
#: Compressed, but with the policy's fallback budgets (MEDA: uniform; see policies/meda.py).
FALLBACK_REASONS = ("text_only", "vision_only", "no_cross_modal_rows")

METRICS: dict[str, MetricDef] = {
    d.name: d
    for d in (
        # worker process: the compression itself
        MetricDef(
            "meda:requests_compressed",
            "counter",
            "Requests whose prompt KV cache was compressed after prefill.",
            ("policy",),
        ),
        MetricDef(
            "meda:requests_fallback",
            "counter",
            "Compressed requests that used the policy's fallback layer budgets, by reason.",
            ("reason",),
        ),
        MetricDef(
            "meda:kv_tokens_before",
            "counter",
            "Prompt tokens of compressed requests, before compression (per layer).",
        ),
        MetricDef(
            "meda:kv_tokens_after",
            "counter",
            "Tokens kept per layer by compressed requests (physical length after compaction).",
        ),
        MetricDef(
            "meda:compression_ratio",
            "histogram",
            "Kept tokens / prompt tokens per compressed request (0.2 = five times smaller).",
            buckets=RATIO_BUCKETS,
        ),
        MetricDef(
            "meda:compression_seconds",
            "histogram",
            "Time to score, select, merge and compact one request's KV cache.",
            buckets=SECONDS_BUCKETS,
        ),
        MetricDef(
            "meda:layer_budget_ratio",
            "gauge",
            "Per-layer budget / prompt tokens of the most recently compressed request.",
            ("layer",),
        ),
        MetricDef(
            "meda:layer_kept_tokens",
            "counter",
            "Per-layer budgets summed over compressed requests (divide by kv_tokens_before).",
            ("layer",),
        ),
        # scheduler (EngineCore process): the memory
        MetricDef(
            "meda:requests_skipped",
            "counter",
            "Requests not compressed, by reason.",
            ("reason",),
        ),
        MetricDef(
            "meda:kv_blocks_freed",
            "counter",
            "KV cache blocks (pages) returned to vLLM's block pool by compression.",
        ),
        MetricDef(
            "meda:kv_bytes_saved",
            "counter",
            "Bytes of KV cache (all layers) returned to the block pool by compression.",
        ),
        MetricDef(
            "meda:kv_blocks_saved",
            "gauge",
            "Blocks that running compressed requests would hold more without compression.",
        ),
        MetricDef(
            "meda:kv_cache_saved_perc",
            "gauge",
            "kv_blocks_saved as a fraction of the pool (add to vllm:kv_cache_usage_perc for "
            "the usage without compression; 1 = 100 percent).",
        ),
        MetricDef(
            "meda:kv_cache_blocks",
            "gauge",
            "Usable blocks in the KV cache pool (the denominator of vllm:kv_cache_usage_perc).",
        ),
        # worker process, at engine start
        MetricDef(
            "meda:workspace_bytes",
            "gauge",
            "Device memory set aside at engine start for compressing one request "
            "(kv_workspace_bytes; excluded from the KV cache unless --kv-cache-memory-bytes).",
        ),
        MetricDef(
            "meda:kv_policy",
            "info",
            "Server-wide KV compression settings (per-request overrides may differ).",
            ("policy", "budget", "window"),
        ),
    )
}


def exposed_names() -> list[str]:
    """Every sample name the server can expose under ``meda:``."""
    return sorted(n for d in METRICS.values() for n in d.sample_names())


# ---- producer side ---------------------------------------------------------------------------

LabelKey = tuple[tuple[str, str], ...]


def _key(labels: dict[str, Any]) -> LabelKey:
    return tuple(sorted((k, str(v)) for k, v in labels.items()))


class Recorder:
    """This process's numbers; ``flush()`` writes them to ``<directory>/p<pid>.json``."""

    def __init__(self, directory: str | None, base: dict[str, str] | None = None):
        self.directory = directory
        self.base: dict[str, str] = dict(base or {})
        self.pid = os.getpid()
        self._lock = threading.Lock()
        self._counters: dict[tuple[str, LabelKey], float] = {}
        self._gauges: dict[tuple[str, LabelKey], float] = {}
        self._hists: dict[tuple[str, LabelKey], list[float]] = {}  # buckets..., sum, count
        self._infos: set[tuple[str, LabelKey]] = set()
        self._dirty = threading.Event()
        self._thread: threading.Thread | None = None

    def _series(self, name: str, kind: str, labels: dict[str, Any]) -> tuple[str, LabelKey]:
        d = METRICS[name]
        if d.kind != kind:
            raise ValueError(f"{name} is a {d.kind}, not a {kind}")
        full = {**self.base, **labels}
        if set(full) != set(d.labelnames):
            raise ValueError(f"{name} takes labels {d.labelnames}, got {sorted(full)}")
        return name, _key(full)

    def inc(self, name: str, amount: float = 1.0, **labels: Any) -> None:
        s = self._series(name, "counter", labels)
        with self._lock:
            self._counters[s] = self._counters.get(s, 0.0) + amount
        self._touch()

    def set(self, name: str, value: float, **labels: Any) -> None:
        s = self._series(name, "gauge", labels)
        with self._lock:
            self._gauges[s] = float(value)
        self._touch()

    def observe(self, name: str, value: float, **labels: Any) -> None:
        s = self._series(name, "histogram", labels)
        bounds = METRICS[name].buckets
        with self._lock:
            h = self._hists.setdefault(s, [0.0] * (len(bounds) + 2))
            if not math.isnan(value):
                for i, b in enumerate(bounds):
                    if value <= b:
                        h[i] += 1
                        break
                h[-2] += value
                h[-1] += 1
        self._touch()

    def info(self, name: str, **labels: Any) -> None:
        s = self._series(name, "info", labels)
        with self._lock:
            self._infos.add(s)
        self._touch()

    def snapshot(self) -> dict[str, Any]:
        with self._lock:
            series = [
                {"name": n, "labels": dict(k), "value": v} for (n, k), v in self._counters.items()
            ]
            series += [
                {"name": n, "labels": dict(k), "value": v} for (n, k), v in self._gauges.items()
            ]
            series += [
                {"name": n, "labels": dict(k), "hist": list(h)} for (n, k), h in self._hists.items()
            ]
            series += [{"name": n, "labels": dict(k), "value": 1.0} for n, k in self._infos]
        return {"version": 1, "pid": self.pid, "series": series}

    def flush(self) -> None:
        if not self.directory:
            return
        try:
            os.makedirs(self.directory, exist_ok=True)
            path = os.path.join(self.directory, f"p{self.pid}.json")
            tmp = f"{path}.{threading.get_ident()}.tmp"
            with open(tmp, "w") as f:
                json.dump(self.snapshot(), f, separators=(",", ":"))
            os.replace(tmp, path)
        except OSError as e:  # metrics must never take the engine down
            logger.warning("meda-vllm: could not write metrics to %s: %s", self.directory, e)

    def _touch(self) -> None:
        if not self.directory:
            return
        self._dirty.set()
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="meda-metrics", daemon=True)
            self._thread.start()
            atexit.register(self.flush)

    def _run(self) -> None:
        while True:
            self._dirty.wait()
            time.sleep(FLUSH_SECONDS)  # coalesce a burst of updates into one write
            self._dirty.clear()
            self.flush()


_RECORDER: Recorder | None = None


def recorder() -> Recorder:
    """This process's recorder (a fresh one after a fork)."""
    global _RECORDER
    if _RECORDER is None or _RECORDER.pid != os.getpid():
        _RECORDER = Recorder(os.environ.get(ENV_DIR))
    return _RECORDER


def _configure(vllm_config: Any) -> Recorder:
    rec = recorder()
    if not rec.base:
        model = getattr(getattr(vllm_config, "model_config", None), "served_model_name", None)
        if isinstance(model, (list, tuple)):
            model = model[0] if model else None
        parallel = getattr(vllm_config, "parallel_config", None)
        rec.base = {
            "model_name": str(model or "unknown"),
            "engine": str(getattr(parallel, "data_parallel_rank", 0) or 0),
        }
    return rec


# ---- hooks called from scheduler.py and worker.py ---------------------------------------------


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
    rec = _configure(scheduler.vllm_config)
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
    for layer in range(len(group.layer_names)):
        rec.inc("meda:layer_kept_tokens", 0, layer=layer)
    for name in ("meda:compression_ratio", "meda:compression_seconds"):
        rec.observe(name, math.nan)  # creates the buckets, counts nothing


@_safe
def on_skip(reason: str, vllm_config: Any = None) -> None:
    """A request will not be compressed (scheduler or worker side)."""
    rec = _configure(vllm_config) if vllm_config is not None else recorder()
    if rec.base:
        rec.inc("meda:requests_skipped", reason=reason)


@_safe
def on_blocks_freed(state: Any, freed_blocks: int) -> None:
    """The scheduler returned a compressed request's tail blocks to the pool."""
    ctx = _SCHED.get(id(state))
    if ctx is None:
        return
    rec = recorder()
    rec.inc("meda:kv_blocks_freed", freed_blocks)
    rec.inc("meda:kv_bytes_saved", freed_blocks * ctx.bytes_per_block)
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
def on_compressed(vllm_config: Any, stats: Any, policy: str) -> None:
    """The worker compressed one request (``stats``: worker.CompressionStats)."""
    rec = _configure(vllm_config)
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


@_safe
def on_workspace(vllm_config: Any, workspace_bytes: int) -> None:
    """The worker resolved (and reserved) its compression workspace."""
    _configure(vllm_config).set("meda:workspace_bytes", workspace_bytes)


# ---- API server side ---------------------------------------------------------------------------


def read_snapshots(directory: str | os.PathLike | None) -> list[dict[str, Any]]:
    if not directory or not os.path.isdir(directory):
        return []
    out = []
    for path in sorted(Path(directory).glob("p*.json")):
        try:
            out.append(json.loads(path.read_text()))
        except (OSError, ValueError):
            continue  # removed meanwhile, or not ours
    return out


def merge_snapshots(snapshots: Iterable[dict[str, Any]]) -> dict[tuple[str, LabelKey], Any]:
    """Sum counters and histograms over processes; gauges and infos have one producer."""
    merged: dict[tuple[str, LabelKey], Any] = {}
    for snap in snapshots:
        for s in snap.get("series", ()):
            d = METRICS.get(s.get("name"))
            if d is None:
                continue
            key = (d.name, _key(s.get("labels", {})))
            if d.kind == "histogram":
                h = s.get("hist") or []
                if len(h) != len(d.buckets) + 2:
                    continue
                prev = merged.get(key)
                merged[key] = h if prev is None else [a + b for a, b in zip(prev, h, strict=True)]
            elif d.kind in ("counter", "gauge"):
                merged[key] = merged.get(key, 0.0) + float(s.get("value", 0.0))
            else:
                merged[key] = 1.0
    return merged


class MedaCollector:
    """prometheus_client collector over the snapshots in ``directory`` (default: the env)."""

    def __init__(self, directory: str | os.PathLike | None = None):
        self._directory = directory

    @property
    def directory(self) -> str | None:
        if self._directory is not None:
            return str(self._directory)
        return os.environ.get(ENV_DIR)

    def describe(self) -> Iterator[Any]:
        yield from _families({})

    def collect(self) -> Iterator[Any]:
        # Only families with samples: with --kv-policy none, /metrics stays stock vLLM's.
        for fam in _families(merge_snapshots(read_snapshots(self.directory))):
            if fam.samples:
                yield fam


def _families(merged: dict[tuple[str, LabelKey], Any]) -> Iterator[Any]:
    from prometheus_client.core import (
        CounterMetricFamily,
        GaugeMetricFamily,
        HistogramMetricFamily,
        InfoMetricFamily,
    )

    by_name: dict[str, list[tuple[LabelKey, Any]]] = {}
    for (name, key), value in sorted(merged.items()):
        by_name.setdefault(name, []).append((key, value))
    for d in METRICS.values():
        names = list(d.labelnames)
        if d.kind == "counter":
            fam = CounterMetricFamily(d.name, d.help, labels=names)
        elif d.kind == "gauge":
            fam = GaugeMetricFamily(d.name, d.help, labels=names)
        elif d.kind == "histogram":
            fam = HistogramMetricFamily(d.name, d.help, labels=names)
        else:
            fam = InfoMetricFamily(d.name, d.help, labels=list(BASE_LABELS))
        for key, value in by_name.get(d.name, ()):
            labels = dict(key)
            if set(labels) != set(names):
                continue
            values = [labels[n] for n in names]
            if d.kind == "histogram":
                cumulative, buckets = 0.0, []
                for bound, count in zip(d.buckets, value[:-2], strict=True):
                    cumulative += count
                    buckets.append((_le(bound), cumulative))
                buckets.append(("+Inf", value[-1]))
                fam.add_metric(values, buckets, value[-2])
            elif d.kind == "info":
                fam.add_metric([labels[n] for n in BASE_LABELS], {n: labels[n] for n in d.labels})
            else:
                fam.add_metric(values, value)
        yield fam


def _le(bound: float) -> str:
    from prometheus_client.utils import floatToGoString

    return floatToGoString(bound)


def attach_collector(registry: Any) -> None:
    """Add a MedaCollector to a prometheus_client registry (once per registry)."""
    if getattr(registry, "_meda_collector", None) is not None:
        return
    collector = MedaCollector()
    registry.register(collector)
    registry._meda_collector = collector


def patch_metrics_route() -> None:
    """Make the registry behind vLLM's /metrics route include the ``meda:`` collector."""
    from vllm.entrypoints.serve.instrumentator import metrics as route

    if getattr(route, "_meda_patched", False):
        return
    orig = route.get_prometheus_registry

    def get_prometheus_registry():
        registry = orig()
        attach_collector(registry)
        return registry

    get_prometheus_registry.__wrapped__ = orig
    route.get_prometheus_registry = get_prometheus_registry
    route._meda_patched = True


# ---- process setup -----------------------------------------------------------------------------


def init_process() -> None:
    """Called by ``register()`` in every vLLM process: settle the snapshot folder (see top)."""
    if multiprocessing.parent_process() is not None and os.environ.get(ENV_DIR):
        return  # a vLLM child: share the folder of the process that started us
    path = os.path.join(
        tempfile.gettempdir(), f"meda-vllm-metrics-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    )
    os.environ[ENV_DIR] = path
    atexit.register(_remove_dir, path, os.getpid())


def _remove_dir(path: str, owner: int) -> None:
    if os.getpid() == owner:  # not in forked children, which inherit atexit handlers
        with contextlib.suppress(OSError):
            shutil.rmtree(path, ignore_errors=True)
