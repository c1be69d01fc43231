"""The ``vllm.general_plugins`` entry point.

vLLM calls ``register()`` in every process it starts (API server, EngineCore,
workers, short-lived helpers). It checks the vLLM version once and installs
the patches of ``patches.PATCHES`` (one module per vLLM target; PATCHES.md),
idempotently. Patches of modules that a process has not imported yet are
applied when the module is first imported, so a process pays only for what it
uses.
"""

from __future__ import annotations

import importlib.abc
import importlib.util
import sys
from collections.abc import Callable
from types import ModuleType

from meda_vllm.vllm_adapter.patches import (
    attention,
    engine_args,
    group_metadata,
    initialize_kv_cache,
    kv_cache_groups,
    kv_cache_manager,
    metrics_route,
    model_state,
    online_renderer,
    sampling_params,
    scheduler,
    v1_runner,
    v2_runner,
    workers,
)

_REGISTERED = False
_HOOKS: dict[str, list[Callable[[], None]]] = {}


class _PatchOnImport(importlib.abc.MetaPathFinder):
    """Runs the hooks of a module right after it is first imported."""

    def find_spec(self, fullname, path, target=None):
        if fullname not in _HOOKS:
            return None
        sys.meta_path.remove(self)
        try:
            spec = importlib.util.find_spec(fullname)
        finally:
            sys.meta_path.insert(0, self)
        if spec is None or spec.loader is None:
            return spec
        loader = spec.loader
        orig_exec = loader.exec_module

        def exec_module(module, _orig=orig_exec, _name=fullname):
            _orig(module)
            for hook in _HOOKS.pop(_name, []):
                hook()

        loader.exec_module = exec_module
        return spec


_FINDER = _PatchOnImport()


def on_import(module: str, hook: Callable[[], None]) -> None:
    """Call ``hook`` now if ``module`` is imported, else right after its import."""
    if module in sys.modules:
        hook()
        return
    _HOOKS.setdefault(module, []).append(hook)
    if _FINDER not in sys.meta_path:
        sys.meta_path.insert(0, _FINDER)


def register() -> None:
    global _REGISTERED
    if _REGISTERED:
        return
    _REGISTERED = True
    from meda_vllm.vllm_adapter.compat import check_vllm_version

    check_vllm_version()
    from meda_vllm.vllm_adapter.metrics import init_process

    init_process()
    for target, apply in PATCHES:
        on_import(target, apply)


#: (the vLLM module whose import triggers the patch, the function that applies it).
PATCHES: tuple[tuple[str, Callable[[], None]], ...] = (
    ("vllm.engine.arg_utils", engine_args.apply),
    ("vllm.sampling_params", sampling_params.apply),
    ("vllm.renderers.online_renderer", online_renderer.apply),
    ("vllm.v1.core.sched.scheduler", scheduler.apply),
    ("vllm.v1.core.kv_cache_manager", kv_cache_manager.apply),
    ("vllm.v1.core.kv_cache_utils", kv_cache_groups.apply),
    ("vllm.v1.worker.gpu_model_runner", v1_runner.apply),
    ("vllm.v1.worker.gpu.model_runner", v2_runner.apply),
    ("vllm.v1.worker.gpu_model_runner", initialize_kv_cache.apply_v1),
    ("vllm.v1.worker.gpu.model_runner", initialize_kv_cache.apply_v2),
    ("vllm.v1.worker.gpu_worker", workers.apply_gpu_worker),
    ("vllm.v1.worker.cpu_worker", workers.apply_cpu_worker),
    ("vllm.entrypoints.serve.instrumentator.metrics", metrics_route.apply),
)

#: Patches installed on instances while compression is set up, not on a module's import.
AT_SETUP: tuple[ModuleType, ...] = (attention, model_state, group_metadata)
