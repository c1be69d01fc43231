"""``determine_available_memory`` of ``vllm.v1.worker.gpu_worker.Worker`` and of
``vllm.v1.worker.cpu_worker.CPUWorker`` (which overrides it).

Why: the compression workspace (``kv_workspace_bytes``, docs/INTEGRATION.md "Memory")
must be set aside before vLLM sizes the KV cache, so ``--gpu-memory-utilization`` (or the
CPU worker's memory) still holds.

How: after the original, subtracts the workspace from the returned bytes (and from the
GPU worker's ``available_kv_cache_memory_bytes``), except with an explicit
``--kv-cache-memory-bytes`` (vLLM's KV cache size: the workspace comes on top); logs one
line and sets ``meda:workspace_bytes`` (``memory.reserve_workspace``).

Remove when: vLLM lets plugins reserve device memory before KV cache sizing.
"""

from __future__ import annotations

from typing import Any


def _wrap(cls: Any) -> None:
    from meda_vllm.vllm_adapter.memory import reserve_workspace

    if cls.__dict__.get("_meda_patched", False):
        return
    orig = cls.determine_available_memory

    def determine_available_memory(self):
        return reserve_workspace(self, orig(self))

    cls.determine_available_memory = determine_available_memory
    cls._meda_patched = True


def apply_gpu_worker() -> None:
    from vllm.v1.worker.gpu_worker import Worker

    _wrap(Worker)


def apply_cpu_worker() -> None:
    from vllm.v1.worker.cpu_worker import CPUWorker

    _wrap(CPUWorker)
