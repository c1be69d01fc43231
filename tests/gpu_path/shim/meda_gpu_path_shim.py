"""Test-only ``vllm.general_plugins`` entry: vLLM's GPU code path on the CPU build.

Active only with ``TRITON_INTERPRET=1`` on vLLM's CPU platform (never installed for
users; ``tests/gpu_path`` puts this folder on ``PYTHONPATH``). Together with the stub
Triton backend ``meda_triton_cpu_stub`` (which keeps vLLM's ``HAS_TRITON`` true, so
Model Runner V2 is available) it lets a CPU server run:

* ``--attention-backend TRITON_ATTN``: ``CpuPlatform.get_attn_backend_cls`` returns
  CPU_ATTN whatever is asked; an explicit TRITON_ATTN request is let through;
* ``torch.cuda.get_device_capability(<cpu device>)`` answers ``(8, 0)``: vLLM's
  ``triton_reshape_and_cache_flash`` asks it for the key's device to size a tile.

Opt-in evidence of what ran: with ``MEDA_GPU_PATH_KERNEL_COUNTS=PATH`` every process
that loads this plugin counts interpreted Triton kernel launches per kernel
(``module.function``) and records the worker's model-runner class and attention impls;
it rewrites ``PATH`` (``{pid}`` replaced by its process id; ``.{pid}`` appended when
absent) as JSON after each change, atomically, so a test can read it while the server
runs.
"""

from __future__ import annotations

import importlib.abc
import importlib.util
import json
import os
import sys
import threading
from collections import Counter
from typing import Any

COUNTS_ENV = "MEDA_GPU_PATH_KERNEL_COUNTS"
_DONE: set[str] = set()


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


def register() -> None:
    """Called by vLLM in every process; idempotent."""
    if not _interpreting():
        return
    from vllm.platforms import current_platform

    if not current_platform.is_cpu():
        return
    _once("attention", _allow_triton_attention)
    _once("capability", _cpu_device_capability)
    if os.environ.get(COUNTS_ENV):
        _once("counter", _install_counter)


def _once(name: str, fn) -> None:
    if name not in _DONE:
        _DONE.add(name)
        fn()


def _allow_triton_attention() -> None:
    from vllm.platforms.cpu import CpuPlatform
    from vllm.v1.attention.backends.registry import AttentionBackendEnum

    original = CpuPlatform.get_attn_backend_cls.__func__

    def get_attn_backend_cls(cls, selected_backend, attn_selector_config, num_heads=None):
        if (
            selected_backend == AttentionBackendEnum.TRITON_ATTN
            and not attn_selector_config.use_mla
            and not attn_selector_config.use_sparse
        ):
            return AttentionBackendEnum.TRITON_ATTN.get_path()
        return original(cls, selected_backend, attn_selector_config, num_heads)

    CpuPlatform.get_attn_backend_cls = classmethod(get_attn_backend_cls)


def _cpu_device_capability() -> None:
    import torch

    original = torch.cuda.get_device_capability

    def get_device_capability(device=None):
        if device is not None and torch.device(device).type == "cpu":
            return (8, 0)
        return original(device)

    torch.cuda.get_device_capability = get_device_capability


# ---- opt-in evidence: kernel launches, runner class, attention impls ------------------------


class _Record:
    """One process's evidence; a forked child starts its own (empty) record and file."""

    def __init__(self, path_template: str):
        self.template = path_template
        self.lock = threading.Lock()
        self.pid = -1
        self._reset()

    def _reset(self) -> None:
        self.pid = os.getpid()
        self.kernels: Counter[str] = Counter()
        self.facts: dict[str, Any] = {"pid": self.pid, "argv": sys.argv[:3]}

    def launch(self, name: str) -> None:
        with self.lock:
            if self.pid != os.getpid():
                self._reset()
            self.kernels[name] += 1
            self._write()

    def note(self, **facts: Any) -> None:
        with self.lock:
            if self.pid != os.getpid():
                self._reset()
            self.facts.update(facts)
            self._write()

    def _write(self) -> None:
        if "{pid}" in self.template:
            path = self.template.replace("{pid}", str(self.pid))
        else:
            path = f"{self.template}.{self.pid}"
        data = {**self.facts, "kernels": dict(sorted(self.kernels.items()))}
        tmp = f"{path}.tmp"
        with open(tmp, "w") as f:
            json.dump(data, f, indent=1)
        os.replace(tmp, path)


def _install_counter() -> None:
    from triton.runtime.interpreter import GridExecutor

    record = _Record(os.environ[COUNTS_ENV])
    original_call = GridExecutor.__call__

    def __call__(self, *args, **kwargs):
        fn = self.fn
        record.launch(f"{getattr(fn, '__module__', '?')}.{getattr(fn, '__name__', fn)}")
        return original_call(self, *args, **kwargs)

    GridExecutor.__call__ = __call__
    _after_import("vllm.v1.worker.worker_base", lambda: _record_worker_facts(record))


def _record_worker_facts(record: _Record) -> None:
    """Note the model runner's class and the attention impls once the KV caches exist."""
    from vllm.v1.worker.worker_base import WorkerWrapperBase

    original = WorkerWrapperBase.initialize_from_config

    def initialize_from_config(self, kv_cache_configs):
        result = original(self, kv_cache_configs)
        runner = getattr(self.worker, "model_runner", None)
        context = self.vllm_config.compilation_config.static_forward_context
        impls = {type(layer.impl).__name__ for layer in context.values() if hasattr(layer, "impl")}
        record.note(
            runner=f"{type(runner).__module__}.{type(runner).__qualname__}",
            attention_impls=sorted(impls),
        )
        return result

    WorkerWrapperBase.initialize_from_config = initialize_from_config


def _after_import(module: str, hook) -> None:
    """Run ``hook`` now if ``module`` is imported, else right after its first import."""
    if module in sys.modules:
        hook()
        return

    class Finder(importlib.abc.MetaPathFinder):
        def find_spec(self, fullname, path, target=None):
            if fullname != module:
                return None
            sys.meta_path.remove(self)
            spec = importlib.util.find_spec(fullname)
            if spec is None or spec.loader is None:
                return spec
            exec_module = spec.loader.exec_module

            def run(mod):
                exec_module(mod)
                hook()

            spec.loader.exec_module = run
            return spec

    sys.meta_path.insert(0, Finder())
