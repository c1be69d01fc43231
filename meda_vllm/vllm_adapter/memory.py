"""The compression workspace: its size, and setting it aside before vLLM sizes the KV cache.

``kv_workspace_bytes`` bounds what compressing one request allocates (plan, merge,
compaction; docs/INTEGRATION.md, "Memory"); 0 means enough for one layer at
``max_model_len`` (``meda_vllm.workspace.auto_workspace_bytes``). The worker patch
(``patches/workers.py``) subtracts it from what vLLM found for the KV cache.
"""

from __future__ import annotations

from typing import Any

import torch

from meda_vllm.config import KVPolicyConfig
from meda_vllm.kernels import resolve_backend
from meda_vllm.policies import policy_names
from meda_vllm.vllm_adapter import metrics, settings
from meda_vllm.vllm_adapter.log import logger
from meda_vllm.workspace import auto_workspace_bytes


def _max_query_rows(cfg: KVPolicyConfig, max_model_len: int) -> int:
    """The most query rows any policy a request may pick captures per layer with these
    server settings (each policy's ``max_query_rows``)."""
    rows = [
        cfg.merged({"kv_policy": name}).policy.max_query_rows(max_model_len)
        for name in policy_names()
    ]
    return min(max_model_len, max(rows, default=0))


def resolve_workspace(vllm_config: Any, cfg: KVPolicyConfig) -> int:
    """``kv_workspace_bytes``, or for 0 (auto) the bytes of one layer at ``max_model_len``
    (``workspace.auto_workspace_bytes``) for this model and device."""
    if cfg.kv_workspace_bytes:
        return cfg.kv_workspace_bytes
    mc, pc = vllm_config.model_config, vllm_config.parallel_config
    device = torch.device(vllm_config.device_config.device_type)
    sms = 1
    if device.type == "cuda" and torch.cuda.is_available():
        sms = torch.cuda.get_device_properties(torch.cuda.current_device()).multi_processor_count
    return auto_workspace_bytes(
        mc.max_model_len,
        heads=mc.get_num_attention_heads(pc),
        kv_heads=mc.get_num_kv_heads(pc),
        head_size=mc.get_head_size(),
        dtype=mc.dtype,
        max_query_rows=_max_query_rows(cfg, mc.max_model_len),
        num_layers=mc.get_num_layers(pc),
        fast=resolve_backend(None, device) == "triton",
        num_sms=sms,
    )


def reserve_workspace(worker: Any, available: int) -> int:
    """The KV cache bytes left once the compression workspace is set aside (``patches/workers.py``).

    ``available``: what vLLM's ``determine_available_memory`` found for the KV cache. An
    explicit ``--kv-cache-memory-bytes`` is vLLM's KV cache size: the workspace comes on
    top of it (not subtracted). Otherwise (``--gpu-memory-utilization`` on GPU, the CPU
    worker's requested memory) it is subtracted, so vLLM sizes the cache without it."""
    vllm_config = worker.vllm_config
    server = settings.server_config(vllm_config)
    if server.kv_policy == "none":
        return available
    workspace = resolve_workspace(vllm_config, server)
    explicit = vllm_config.cache_config.kv_cache_memory_bytes is not None
    how = "auto: one layer at max_model_len" if not server.kv_workspace_bytes else "set"
    if explicit:
        left = available
        where = "on top of --kv-cache-memory-bytes"
    else:
        left = available - workspace
        where = "taken out of the KV cache budget"
        if hasattr(worker, "available_kv_cache_memory_bytes"):  # GPU worker's own record
            worker.available_kv_cache_memory_bytes = left
        if left <= 0:
            raise ValueError(
                f"meda-vllm: the compression workspace ({workspace} bytes, kv_workspace_bytes) "
                f"does not fit the {available} bytes vLLM found for the KV cache; lower "
                "kv_workspace_bytes or --max-model-len, or raise --gpu-memory-utilization"
            )
    logger.info(
        "meda-vllm: compression workspace %.1f MiB (%s), %s: KV cache %.1f MiB",
        workspace / 2**20,
        how,
        where,
        left / 2**20,
    )
    metrics.on_workspace(vllm_config, workspace)
    return left
