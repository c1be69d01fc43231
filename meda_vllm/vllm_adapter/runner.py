"""What the two model-runner patches share (``patches/v1_runner.py``, ``patches/v2_runner.py``,
``patches/initialize_kv_cache.py``): the runner's compression state, forgetting requests,
compressing the armed requests after a forward, reporting kept lengths, and the kernel
block-size check."""

from __future__ import annotations

import copy
from collections.abc import Callable
from typing import Any

from meda_vllm.vllm_adapter import settings
from meda_vllm.vllm_adapter.layouts import UnsupportedLayoutError
from meda_vllm.vllm_adapter.log import logger
from meda_vllm.vllm_adapter.protocol import ARM_ATTR, RESULT_ATTR
from meda_vllm.vllm_adapter.worker import WorkerCompression


def state_of(runner: Any) -> WorkerCompression | None:
    """The runner's compression state (None when the server does not compress)."""
    state = getattr(runner, "_meda", False)
    if state is False:
        server = settings.server_config(runner.vllm_config)
        state = WorkerCompression(runner, server) if server.kv_policy != "none" else None
        runner._meda = state
    return state


def forget_gone(state: WorkerCompression, scheduler_output: Any) -> None:
    """Drop the state (capture buffers included) of finished (aborted: also in
    ``finished_req_ids``), preempted and resumed requests; remember the preempted ones
    until they finish."""
    finished = set(scheduler_output.finished_req_ids)
    preempted = set(getattr(scheduler_output, "preempted_req_ids", None) or ())
    cached = scheduler_output.scheduled_cached_reqs
    resumed = set(getattr(cached, "resumed_req_ids", None) or ())
    for rid in finished | preempted | resumed:
        state.forget(rid)
    state.preempted |= preempted
    state.preempted -= finished


def report_results(runner: Any, out: Any) -> Any:
    """Put ``{rid: (N, P)}`` of this step's compressions on the ModelRunnerOutput the
    scheduler will receive (``out`` itself, or the one inside an async wrapper)."""
    state = state_of(runner)
    if state is None or not state.results or out is None:
        return out
    from vllm.v1.outputs import EMPTY_MODEL_RUNNER_OUTPUT

    if out is EMPTY_MODEL_RUNNER_OUTPUT:
        out = copy.copy(out)
    # V2 (and V1 async) runners return a wrapper whose get_output() hands the scheduler
    # the ModelRunnerOutput it holds.
    target = out
    for name in ("model_runner_output", "_model_runner_output"):
        inner = getattr(out, name, None)
        if inner is not None and hasattr(inner, "req_ids"):
            target = inner
            break
    if not hasattr(target, "req_ids"):
        logger.warning("meda-vllm: cannot report kept lengths on %s", type(out).__name__)
        return out
    setattr(target, RESULT_ATTR, dict(state.results))
    state.results.clear()
    return out


def after_forward(runner: Any, scheduler_output: Any, out: Any, compress_one: Callable) -> Any:
    """After a real forward: compress the requests armed for this step (their prompt KV
    is now complete in the pages) and report kept lengths if the output is already here."""
    state = state_of(runner)
    if state is None:
        return out
    for rid in getattr(scheduler_output, ARM_ATTR, None) or ():
        compress_one(runner, state, rid)
    return report_results(runner, out)


def check_kernel_block_sizes(runner: Any, kernel_block_sizes: list[int] | None) -> None:
    """Refuse vLLM's virtual kernel-block splitting (a backend whose kernels want smaller
    pages than the KV manager's blocks: each manager block becomes several kernel blocks).
    The worker reads and compacts pages by the manager's block ids and block size, so a
    split cache would be misread. vLLM decides this in ``initialize_kv_cache``, once the
    model's attention backends are known (after the weights load, before the engine
    serves), which is the earliest it can be checked."""
    state = state_of(runner)
    if state is None or not kernel_block_sizes:
        return
    groups = runner.kv_cache_config.kv_cache_groups
    # Encoder-only groups get no kernel block size; models with them are refused earlier.
    for group, kernel in zip(groups, kernel_block_sizes, strict=False):
        manager = group.kv_cache_spec.block_size
        if kernel != manager:
            message = (
                f"meda-vllm: --kv-policy {state.server.kv_policy} needs the attention "
                f"kernels' block size to equal the KV cache block size; the backend splits "
                f"--block-size {manager} into kernel blocks of {kernel} (pass --block-size "
                f"{kernel}, another --attention-backend, or --kv-policy none)"
            )
            logger.error(message)
            raise UnsupportedLayoutError(message)
