"""The ``vllm.general_plugins`` entry point.

vLLM calls ``register()`` in every process it starts (API server, EngineCore,
workers, short-lived helpers). It checks the vLLM version once and installs
the patches listed in PATCHES.md, idempotently. Patches of modules that a
process has not imported yet are applied when the module is first imported,
so a process pays only for what it uses.
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.util
import sys
from collections.abc import Callable

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
    for target, patch in PATCHES:
        on_import(target, _lazy(patch))


#: (module whose import triggers the patch, "our_module:function") — see PATCHES.md.
PATCHES = (
    ("vllm.engine.arg_utils", "cli:patch_engine_args"),
    ("vllm.sampling_params", "cli:patch_request_validation"),
    ("vllm.v1.core.sched.scheduler", "scheduler:patch_scheduler"),
    ("vllm.v1.worker.gpu_model_runner", "worker:patch_v1_runner"),
    ("vllm.entrypoints.serve.instrumentator.metrics", "metrics:patch_metrics_route"),
    ("vllm.v1.worker.gpu.model_runner", "worker:patch_v2_runner"),
    ("vllm.v1.worker.gpu_worker", "worker:patch_workers"),
    ("vllm.v1.worker.cpu_worker", "worker:patch_cpu_worker"),
)


def _lazy(spec: str) -> Callable[[], None]:
    module, func = spec.split(":")

    def run() -> None:
        getattr(importlib.import_module(f"meda_vllm.vllm_adapter.{module}"), func)()

    return run
