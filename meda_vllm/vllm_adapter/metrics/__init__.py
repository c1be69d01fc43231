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
  (``patches/metrics_route.py``).

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
``meda:requests_compressed_total``. ``catalogue.METRICS`` is the one list of what is
exposed (tests check the dashboard against ``exposed_names()``).

Files: ``catalogue.py`` (what is exposed), ``recording.py`` (a process's numbers and their
snapshot file), ``hooks.py`` (what the scheduler and worker call), ``collector.py`` (the
API server's side). The names below are this package's face.
"""

from __future__ import annotations

from meda_vllm.vllm_adapter.metrics.catalogue import (
    FALLBACK_REASONS,
    METRICS,
    SCHEDULER_SKIP_REASONS,
    WORKER_SKIP_REASONS,
    MetricDef,
    exposed_names,
)
from meda_vllm.vllm_adapter.metrics.collector import (
    MedaCollector,
    attach_collector,
    merge_snapshots,
    read_snapshots,
)
from meda_vllm.vllm_adapter.metrics.hooks import (
    on_blocks_freed,
    on_blocks_held,
    on_compressed,
    on_records_changed,
    on_scheduler_attached,
    on_skip,
    on_workspace,
)
from meda_vllm.vllm_adapter.metrics.recording import ENV_DIR, Recorder, init_process, recorder

__all__ = [
    "ENV_DIR",
    "FALLBACK_REASONS",
    "METRICS",
    "SCHEDULER_SKIP_REASONS",
    "WORKER_SKIP_REASONS",
    "MedaCollector",
    "MetricDef",
    "Recorder",
    "attach_collector",
    "exposed_names",
    "init_process",
    "merge_snapshots",
    "on_blocks_freed",
    "on_blocks_held",
    "on_compressed",
    "on_records_changed",
    "on_scheduler_attached",
    "on_skip",
    "on_workspace",
    "read_snapshots",
    "recorder",
]
