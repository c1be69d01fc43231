"""Worker side: compress after the last prefill chunk, then run on physical slots.

V1 model runner (the CPU runner and GPU V1 subclass it). Per compressed request:

* after the forward of the step that carried its last prefill chunk, the KV of
  every layer is scored, selected (and merged) by the core, and compacted in
  place into the request's leading slots; the request's block-table row is
  truncated to the kept blocks (the scheduler frees the same tail);
* from the next step on, ``removed = N - P`` is subtracted from the positions
  used for the slot mapping and from ``seq_lens`` (physical), while the
  positions fed to RoPE stay logical, so decoding continues at position N.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from meda_vllm.compress import compress, required_query_positions
from meda_vllm.config import KVPolicyConfig
from meda_vllm.kernels import compact_, gather_kv
from meda_vllm.kernels.layout import PagedKVLayout
from meda_vllm.modality import modality_mask
from meda_vllm.types import LayerView
from meda_vllm.vllm_adapter import capture, settings
from meda_vllm.vllm_adapter.log import logger
from meda_vllm.vllm_adapter.scheduler import ARM_ATTR, RESULT_ATTR, cdiv


@dataclass
class RequestInfo:
    cfg: KVPolicyConfig
    n_prompt: int
    vis: torch.Tensor | None


@dataclass
class CompressionStats:
    """Worker-side record of one compression (exported as metrics)."""

    rid: str
    n_prompt: int
    kept: int
    layer_budgets: list[int]
    seconds: float
    fallback: str | None


@dataclass
class WorkerCompression:
    runner: Any
    server: KVPolicyConfig
    layer_names: list[str] = field(default_factory=list)
    layouts: list[PagedKVLayout] = field(default_factory=list)
    block_size: int = 0
    ready: bool = False
    infos: dict[str, RequestInfo] = field(default_factory=dict)
    captures: dict[str, capture.RequestCapture] = field(default_factory=dict)
    removed: dict[str, int] = field(default_factory=dict)
    results: dict[str, tuple[int, int]] = field(default_factory=dict)
    history: list[CompressionStats] = field(default_factory=list)

    # ---- setup -------------------------------------------------------------------------
    def setup(self) -> None:
        from vllm.model_executor.models.utils import extract_layer_index

        ctx = self.runner.compilation_config.static_forward_context
        layers = {
            name: layer
            for name, layer in ctx.items()
            if hasattr(layer, "impl") and hasattr(layer, "kv_cache") and layer.kv_cache.numel()
        }
        if not layers:
            raise RuntimeError("meda-vllm: no attention layer with a KV cache found")
        index = {name: extract_layer_index(name) for name in layers}
        self.layer_names = sorted(layers, key=index.__getitem__)
        if [index[n] for n in self.layer_names] != list(range(len(self.layer_names))):
            raise RuntimeError("meda-vllm: attention layers are not numbered 0..L-1")
        from meda_vllm.vllm_adapter.layouts import layout_for

        self.layouts = [layout_for(layers[n], layers[n].kv_cache) for n in self.layer_names]
        self.block_size = self.layouts[0].block_size
        capture.wrap_attention_layers(layers, index)
        self.ready = True
        logger.info(
            "meda-vllm: worker ready: %d layers, block size %d, backend %s",
            len(self.layer_names),
            self.block_size,
            type(layers[self.layer_names[0]].impl).__name__,
        )

    def cache(self, layer: int) -> torch.Tensor:
        ctx = self.runner.compilation_config.static_forward_context
        return ctx[self.layer_names[layer]].kv_cache

    # ---- request bookkeeping -------------------------------------------------------------
    def info(self, rid: str) -> RequestInfo | None:
        info = self.infos.get(rid)
        if info is not None:
            return info
        req = self.runner.requests.get(rid)
        if req is None:
            return None
        sp = req.sampling_params
        try:
            cfg = settings.request_config(self.server, sp.extra_args if sp is not None else None)
        except ValueError:
            cfg = self.server  # validated in the API server; never crash the engine here
        n = req.num_prompt_tokens
        ranges = [
            (f.mm_position.offset, f.mm_position.length, f.mm_position.is_embed)
            for f in (req.mm_features or [])
            if f.mm_position is not None
        ]
        vis = None
        if ranges:
            vis = modality_mask(
                n, [(o, ln) for o, ln, _ in ranges], is_embed=[e for _, _, e in ranges]
            )
        info = RequestInfo(cfg=cfg, n_prompt=n, vis=vis)
        self.infos[rid] = info
        if cfg.kv_policy != "none" and cfg.budget_tokens(n) < n:
            positions = required_query_positions(cfg, n, vis)
            self.captures[rid] = capture.RequestCapture(positions=positions.cpu())
        return info

    def forget(self, rid: str) -> None:
        self.infos.pop(rid, None)
        self.captures.pop(rid, None)
        self.removed.pop(rid, None)

    # ---- per step --------------------------------------------------------------------------
    def plan_capture(
        self, req_ids: list[str], qsl: np.ndarray, computed: np.ndarray, scheduled: np.ndarray
    ) -> capture.CaptureStep | None:
        targets = []
        for i, rid in enumerate(req_ids):
            info = self.info(rid)
            cap = self.captures.get(rid)
            if info is None or cap is None or computed[i] >= info.n_prompt:
                continue
            start, count = int(computed[i]), int(scheduled[i])
            pos = cap.positions
            sel = torch.nonzero((pos >= start) & (pos < start + count)).squeeze(1)
            if sel.numel() == 0:
                continue
            batch_index = int(qsl[i]) + (pos[sel] - start)
            targets.append(capture.CaptureTarget(rid, batch_index, sel))
        if not targets:
            return None
        return capture.CaptureStep(targets, self.captures)

    def compress_request(self, rid: str, cfg_dict: dict[str, Any]) -> None:
        req = self.runner.requests.get(rid)
        info = self.info(rid)
        cap = self.captures.get(rid)
        if req is None or info is None or cap is None:
            return
        cfg = KVPolicyConfig.model_validate(cfg_dict)
        n = info.n_prompt
        if len(cap.rows) != len(self.layer_names):
            logger.warning("meda-vllm: %s: query rows missing, not compressed", rid)
            return
        t0 = time.perf_counter()
        row_ids = req.block_ids[0]
        device = self.cache(0).device
        row = torch.tensor(row_ids[: cdiv(n, self.block_size)], dtype=torch.int32, device=device)
        query_pos = cap.positions.to(device)
        vis = info.vis.to(device) if info.vis is not None else None

        def get_view(layer: int) -> LayerView:
            keys, values = gather_kv(self.cache(layer), self.layouts[layer], row, n)
            queries = cap.rows[layer].to(device).transpose(0, 1)  # [H, R, D]
            return LayerView(
                keys=keys, values=values, queries=queries, query_pos=query_pos, vis=vis
            )

        plan = compress(get_view, len(self.layer_names), cfg, n, pad_to="max")
        self.captures.pop(rid, None)
        if plan is None:
            return
        kept = plan.kept_tokens
        for layer, lp in enumerate(plan.layers):
            compact_(self.cache(layer), self.layouts[layer], row, lp.kept, lp.keys, lp.values)
        keep_blocks = cdiv(kept, self.block_size)
        del row_ids[keep_blocks:]
        batch = self.runner.input_batch
        index = batch.req_id_to_index.get(rid)
        if index is not None:
            batch.block_table.add_row(req.block_ids, index)
        self.removed[rid] = n - kept
        self.results[rid] = (n, kept)
        seconds = time.perf_counter() - t0
        self.history.append(
            CompressionStats(rid, n, kept, list(plan.layer_budgets), seconds, plan.fallback)
        )
        del self.history[:-1024]
        logger.debug("meda-vllm: %s: %d -> %d tokens in %.1f ms", rid, n, kept, seconds * 1e3)


# ---- V1 runner hooks -------------------------------------------------------------------------


def _state(runner: Any) -> WorkerCompression | None:
    state = getattr(runner, "_meda", False)
    if state is False:
        server = settings.server_config(runner.vllm_config)
        state = WorkerCompression(runner, server) if server.kv_policy != "none" else None
        runner._meda = state
    return state


def _apply_physical(runner: Any, state: WorkerCompression, num_reqs: int, total: int) -> None:
    """Slot mapping and seq_lens of compressed requests in physical terms."""
    req_ids = runner.input_batch.req_ids[:num_reqs]
    off = [state.removed.get(rid, 0) for rid in req_ids]
    if not any(off):
        return
    off_cpu = torch.tensor(off, dtype=torch.int64)
    off_dev = off_cpu.to(runner.seq_lens.device)
    req_indices = runner.req_indices.gpu[:total]
    positions = runner.positions[:total] - off_dev[req_indices]
    runner.input_batch.block_table.compute_slot_mapping(
        num_reqs, runner.query_start_loc.gpu[: num_reqs + 1], positions
    )
    runner.seq_lens[:num_reqs] -= off_dev.to(runner.seq_lens.dtype)
    runner.optimistic_seq_lens_cpu[:num_reqs] -= off_cpu.to(runner.optimistic_seq_lens_cpu.dtype)


def patch_v1_runner() -> None:
    from vllm.v1.worker.gpu_model_runner import GPUModelRunner

    if getattr(GPUModelRunner, "_meda_patched", False):
        return
    orig_update = GPUModelRunner._update_states
    orig_prepare = GPUModelRunner._prepare_inputs
    orig_execute = GPUModelRunner.execute_model
    orig_sample = GPUModelRunner.sample_tokens

    def _update_states(self, scheduler_output):
        state = _state(self)
        if state is not None:
            gone = set(scheduler_output.finished_req_ids)
            gone |= set(getattr(scheduler_output, "preempted_req_ids", None) or ())
            cached = scheduler_output.scheduled_cached_reqs
            gone |= set(getattr(cached, "resumed_req_ids", None) or ())
            for rid in gone:
                state.forget(rid)
        return orig_update(self, scheduler_output)

    def _prepare_inputs(self, scheduler_output, num_scheduled_tokens):
        result = orig_prepare(self, scheduler_output, num_scheduled_tokens)
        state = _state(self)
        if state is None:
            return result
        if not state.ready:
            state.setup()
        num_reqs = self.input_batch.num_reqs
        total = scheduler_output.total_num_scheduled_tokens
        _apply_physical(self, state, num_reqs, total)
        step = state.plan_capture(
            list(self.input_batch.req_ids[:num_reqs]),
            self.query_start_loc.np[: num_reqs + 1],
            self.input_batch.num_computed_tokens_cpu[:num_reqs],
            np.asarray(num_scheduled_tokens),
        )
        capture.set_step(step)
        return result

    def execute_model(self, scheduler_output, *args, **kwargs):
        try:
            out = orig_execute(self, scheduler_output, *args, **kwargs)
        finally:
            capture.set_step(None)
        state = _state(self)
        armed = getattr(scheduler_output, ARM_ATTR, None)
        if state is not None and armed:
            for rid, cfg in armed.items():
                state.compress_request(rid, cfg)
        if out is not None and state is not None and state.results:
            out = _attach_results(state, out)
        return out

    def sample_tokens(self, *args, **kwargs):
        out = orig_sample(self, *args, **kwargs)
        state = _state(self)
        if state is not None and state.results and out is not None:
            out = _attach_results(state, out)
        return out

    GPUModelRunner._update_states = _update_states
    GPUModelRunner._prepare_inputs = _prepare_inputs
    GPUModelRunner.execute_model = execute_model
    GPUModelRunner.sample_tokens = sample_tokens
    GPUModelRunner._meda_patched = True


def _attach_results(state: WorkerCompression, out: Any) -> Any:
    import copy

    from vllm.v1.outputs import EMPTY_MODEL_RUNNER_OUTPUT

    if out is EMPTY_MODEL_RUNNER_OUTPUT:
        out = copy.copy(out)
    if not hasattr(out, "req_ids"):  # async output wrapper: not supported in phase 1
        return out
    setattr(out, RESULT_ATTR, dict(state.results))
    state.results.clear()
    return out
