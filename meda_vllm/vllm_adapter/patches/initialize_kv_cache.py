"""``initialize_kv_cache`` of both model runners (V1 ``vllm.v1.worker.gpu_model_runner.
GPUModelRunner``, inherited by the CPU runner; V2 ``vllm.v1.worker.gpu.model_runner.
GPUModelRunner``).

Why: compression must be set up while the engine starts (attention layers, page layouts,
the attention wrappers of ``patches/attention.py``, the workspace), so that a failure stops
the start, not the first request; and vLLM's virtual kernel-block splitting must be
refused: the worker reads pages by the manager's block ids and size. vLLM picks the kernel
block sizes here, once the attention backends are known: the earliest point for both.

How: after the original, compares ``_kernel_block_sizes`` (V1) / ``kernel_block_sizes`` (V2)
with each KV cache group's block size and raises ``UnsupportedLayoutError`` with one line
(``runner.check_kernel_block_sizes``); then, outside the profiling run, sets compression up
(``set_up``; on V2 also ``model_state.prepare_attn``, ``patches/model_state.py``). The runners'
prepare hooks call ``set_up`` too, as a fallback.

Remove when: the worker maps manager blocks to kernel blocks, and vLLM supports shrinking
a request's KV natively.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any


def set_up(runner: Any, state: Any) -> None:
    """Set compression up on this runner: the worker state, then the attention wrappers."""
    from meda_vllm.vllm_adapter.patches.attention import wrap_attention_layers

    state.setup()
    layers = state.attention_layers
    wrap_attention_layers(layers, {name: i for i, name in enumerate(layers)})


def wrap_initialize_kv_cache(
    cls: Any, attr: str, on_ready: Callable[[Any], None] | None = None
) -> None:
    """After ``cls.initialize_kv_cache``: check the kernel block sizes the runner just
    chose (``runner.<attr>``), then set compression up and call ``on_ready(runner)``."""
    from meda_vllm.vllm_adapter import runner as shared

    orig = cls.initialize_kv_cache

    def initialize_kv_cache(self, *args, **kwargs):
        result = orig(self, *args, **kwargs)
        shared.check_kernel_block_sizes(self, getattr(self, attr, None))
        profiling = kwargs.get("is_profiling", args[1] if len(args) > 1 else False)
        state = shared.state_of(self)
        if state is not None and not state.ready and not profiling:
            set_up(self, state)
            if on_ready is not None:
                on_ready(self)
        return result

    cls.initialize_kv_cache = initialize_kv_cache


def _v2_ready(runner: Any) -> None:
    from meda_vllm.vllm_adapter.patches.group_metadata import wrap_group_metadata
    from meda_vllm.vllm_adapter.patches.model_state import wrap_model_state

    wrap_model_state(runner)
    wrap_group_metadata(runner)


def apply_v1() -> None:
    from vllm.v1.worker.gpu_model_runner import GPUModelRunner

    from meda_vllm.vllm_adapter.patches.group_metadata import wrap_group_metadata

    if not getattr(GPUModelRunner.initialize_kv_cache, "_meda", False):
        wrap_initialize_kv_cache(GPUModelRunner, "_kernel_block_sizes", wrap_group_metadata)
        GPUModelRunner.initialize_kv_cache._meda = True


def apply_v2() -> None:
    from vllm.v1.worker.gpu.model_runner import GPUModelRunner

    if not getattr(GPUModelRunner.initialize_kv_cache, "_meda", False):
        wrap_initialize_kv_cache(GPUModelRunner, "kernel_block_sizes", _v2_ready)
        GPUModelRunner.initialize_kv_cache._meda = True
