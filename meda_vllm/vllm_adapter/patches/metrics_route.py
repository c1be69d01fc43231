"""``vllm.entrypoints.serve.instrumentator.metrics.get_prometheus_registry`` (the module
global that ``attach_router`` calls to build the ``/metrics`` registry; API server only).

Why: the ``meda:`` metrics are produced in the EngineCore and worker processes; ``/metrics``
must show them beside vLLM's ``vllm:`` metrics, whichever registry vLLM picks (the global
one, or the multiprocess one with ``--api-server-count`` > 1).

How: the wrapper registers one ``metrics.MedaCollector`` on the registry the original
returns; it reads the per-process snapshots in ``$MEDA_VLLM_METRICS_DIR`` (see
``metrics/__init__.py``).

Remove when: vLLM gains a plugin hook for Prometheus collectors.
"""

from __future__ import annotations


def apply() -> None:
    from vllm.entrypoints.serve.instrumentator import metrics as route

    from meda_vllm.vllm_adapter.metrics import attach_collector

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
