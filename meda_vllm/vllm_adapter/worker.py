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
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from meda_vllm.compress import required_query_positions
from meda_vllm.config import KVPolicyConfig
from meda_vllm.kernels import resolve_backend
from meda_vllm.kernels.layout import PagedKVLayout
from meda_vllm.modality import modality_mask
from meda_vllm.paged_view import apply_plan, plan_paged_request
from meda_vllm.vllm_adapter import capture, metrics, plan_dump, settings
from meda_vllm.vllm_adapter.layouts import UnsupportedLayoutError
from meda_vllm.vllm_adapter.log import logger
from meda_vllm.vllm_adapter.scheduler import ARM_ATTR, RECOMPUTE, RESULT_ATTR, cdiv
from meda_vllm.workspace import WorkspaceTooSmall, auto_workspace_bytes


@dataclass
class RequestInfo:
    cfg: KVPolicyConfig
    n_prompt: int
    vis: torch.Tensor | None
    prompt_ids: list[int] | None = None  # kept only in the plan-dump debug mode


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
    # Preempted and not yet finished: if they come back they are recomputed, never
    # compressed (the scheduler arms only requests with num_preemptions == 0).
    preempted: set[str] = field(default_factory=set)
    results: dict[str, tuple[int, int]] = field(default_factory=dict)
    history: list[CompressionStats] = field(default_factory=list)
    # kv_workspace_bytes resolved at setup (resolve_workspace); None: unbounded
    workspace_bytes: int | None = None

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
        self.workspace_bytes = resolve_workspace(self.runner.vllm_config, self.server)
        metrics.on_workspace(self.runner.vllm_config, self.workspace_bytes)
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
    def register(self, new_reqs: list[Any]) -> None:
        """Note the prompt, modality mask and settings of requests new to this worker.

        The V2 runner also gets a request resumed after preemption as a new one (V1 gets
        it in ``scheduled_cached_reqs.resumed_req_ids``, never here). It will not be
        compressed, so it gets no query-row capture buffer. Resumed = preempted earlier
        on this worker, or its prefill replays output tokens (prefill longer than the
        prompt); a preemption during prefill leaves the second test blind, hence the set.
        """
        for data in new_reqs:
            rid = data.req_id
            self.forget(rid)
            if data.prompt_token_ids is not None:
                n = len(data.prompt_token_ids)
            elif data.prompt_embeds is not None:
                n = int(data.prompt_embeds.shape[0])
            else:
                continue
            prefill = getattr(data, "prefill_token_ids", None)
            resumed = rid in self.preempted or (prefill is not None and len(prefill) > n)
            sp = data.sampling_params
            try:
                cfg = settings.request_config(
                    self.server, sp.extra_args if sp is not None else None
                )
            except ValueError:
                cfg = self.server  # validated in the API server; never crash the engine here
            ranges = [
                (f.mm_position.offset, f.mm_position.length, f.mm_position.is_embed)
                for f in (data.mm_features or [])
                if f.mm_position is not None
            ]
            vis = None
            if ranges:
                vis = modality_mask(
                    n, [(o, ln) for o, ln, _ in ranges], is_embed=[e for _, _, e in ranges]
                )
            dumping = plan_dump.directory() is not None
            ids = list(data.prompt_token_ids) if dumping and data.prompt_token_ids else None
            self.infos[rid] = RequestInfo(cfg=cfg, n_prompt=n, vis=vis, prompt_ids=ids)
            if not resumed and cfg.kv_policy != "none" and cfg.budget_tokens(n) < n:
                positions = required_query_positions(cfg, n, vis)
                self.captures[rid] = capture.RequestCapture(positions=positions.cpu())

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
            info = self.infos.get(rid)
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

    def compress_request(
        self,
        rid: str,
        cfg_dict: dict[str, Any],
        row_ids: list[int],
        truncate: Callable[[int], None],
    ) -> None:
        """Compress one request whose prompt KV is complete in the pages ``row_ids``.

        ``truncate(keep_blocks)`` shortens the request's block-table row (runner-specific).
        """
        info = self.infos.get(rid)
        cap = self.captures.pop(rid, None)
        if info is None or cap is None:
            return
        cfg = KVPolicyConfig.model_validate(cfg_dict)
        n = info.n_prompt
        if len(cap.rows) != len(self.layer_names):
            logger.warning("meda-vllm: %s: query rows missing, not compressed", rid)
            metrics.on_skip("query_rows_missing", self.runner.vllm_config)
            return
        t0 = time.perf_counter()
        device = self.cache(0).device
        row = torch.tensor(row_ids[: cdiv(n, self.block_size)], dtype=torch.int32, device=device)
        query_pos = cap.positions.to(device)
        vis = info.vis.to(device) if info.vis is not None else None
        fast = self.use_paged_kernels(device)
        caches = [self.cache(layer) for layer in range(len(self.layer_names))]
        try:
            plan = plan_paged_request(
                caches,
                self.layouts,
                row,
                n,
                lambda layer: cap.rows[layer].to(device).transpose(0, 1),  # [H, R, D]
                query_pos,
                vis,
                cfg,
                fast=fast,
                workspace=self.workspace_bytes,
            )
        except WorkspaceTooSmall as e:  # nothing written yet: serve it uncompressed
            logger.warning("meda-vllm: %s: not compressed: %s", rid, e)
            metrics.on_skip("workspace", self.runner.vllm_config)
            return
        except Exception:  # noqa: BLE001 - planning only reads the cache: serve uncompressed
            logger.exception("meda-vllm: %s: compression failed; serving it uncompressed", rid)
            metrics.on_skip("error", self.runner.vllm_config)
            return
        if plan is None:
            metrics.on_skip("nothing_to_evict", self.runner.vllm_config)
            return
        kept = plan.kept_tokens
        if plan_dump.directory() is not None:
            plan_dump.write(rid, _dump_record(rid, info, cfg, plan))
        try:
            apply_plan(caches, self.layouts, row, plan)
            truncate(cdiv(kept, self.block_size))
        except Exception:  # noqa: BLE001 - the pages may be half rewritten: recompute
            logger.exception(
                "meda-vllm: %s: compaction failed; the request is recomputed uncompressed", rid
            )
            metrics.on_skip("error", self.runner.vllm_config)
            self.results[rid] = (n, RECOMPUTE)
            return
        self.removed[rid] = n - kept
        self.results[rid] = (n, kept)
        seconds = time.perf_counter() - t0
        self.history.append(
            CompressionStats(rid, n, kept, list(plan.layer_budgets), seconds, plan.fallback)
        )
        metrics.on_compressed(self.runner.vllm_config, self.history[-1], cfg.kv_policy)
        del self.history[:-1024]
        logger.debug("meda-vllm: %s: %d -> %d tokens in %.1f ms", rid, n, kept, seconds * 1e3)

    @staticmethod
    def use_paged_kernels(device: torch.device) -> bool:
        """Score/entropy straight from the pages with Triton (GPU, or forced for tests)."""
        return resolve_backend(None, device) == "triton"


def _dump_record(rid: str, info: RequestInfo, cfg: KVPolicyConfig, plan: Any) -> dict[str, Any]:
    return {
        "request_id": rid,
        "n_prompt": info.n_prompt,
        "prompt_token_ids": info.prompt_ids,
        "vis": None if info.vis is None else info.vis.cpu(),
        "cfg": cfg.model_dump(),
        "layer_budgets": list(plan.layer_budgets),
        "kept": [lp.kept.cpu() for lp in plan.layers],  # per layer [H_kv, P]
        "merged": plan.merges,
    }


# ---- the compression workspace (reserved at engine start) ------------------------------------


def _max_query_rows(cfg: KVPolicyConfig, max_model_len: int) -> int:
    """The most query rows any policy captures per layer with these server settings."""
    visual = cfg.kv_meda_visual_rows or -(-max_model_len // cfg.kv_meda_visual_stride)
    rows = max(cfg.kv_window + visual, cfg.kv_h2o_max_queries, cfg.kv_window)
    return min(max_model_len, rows)


def resolve_workspace(vllm_config: Any, cfg: KVPolicyConfig) -> int:
    """``kv_workspace_bytes``, or for 0 (auto) the bytes of one layer at ``max_model_len``
    (``workspace.auto_workspace_bytes``) for this model and device."""
    if cfg.kv_workspace_bytes:
        return cfg.kv_workspace_bytes
    mc, pc = vllm_config.model_config, vllm_config.parallel_config
    device = torch.device(vllm_config.device_config.device_type)
    fast = WorkerCompression.use_paged_kernels(device)
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
        fast=fast,
        num_sms=sms,
    )


def reserve_workspace(worker: Any, available: int) -> int:
    """The KV cache bytes left once the compression workspace is set aside (patch 23).

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


def patch_workers() -> None:
    """Patch 23: subtract the workspace in every worker's ``determine_available_memory``
    (GPU ``Worker``; the CPU worker overrides the method, so both)."""
    from vllm.v1.worker.gpu_worker import Worker

    _wrap_available_memory(Worker)


def patch_cpu_worker() -> None:
    from vllm.v1.worker.cpu_worker import CPUWorker

    _wrap_available_memory(CPUWorker)


def _wrap_available_memory(cls: Any) -> None:
    if cls.__dict__.get("_meda_patched", False):
        return
    orig = cls.determine_available_memory

    def determine_available_memory(self):
        return reserve_workspace(self, orig(self))

    cls.determine_available_memory = determine_available_memory
    cls._meda_patched = True


# ---- shared by both runners ----------------------------------------------------------------


def _state(runner: Any) -> WorkerCompression | None:
    state = getattr(runner, "_meda", False)
    if state is False:
        server = settings.server_config(runner.vllm_config)
        state = WorkerCompression(runner, server) if server.kv_policy != "none" else None
        runner._meda = state
    return state


def _forget_gone(state: WorkerCompression, scheduler_output: Any) -> None:
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


def _attach_results(state: WorkerCompression, out: Any) -> Any:
    """Put ``{rid: (N, P)}`` on the ModelRunnerOutput the scheduler will receive."""
    import copy

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


def _after_forward(runner: Any, scheduler_output: Any, out: Any, compress_one: Callable) -> Any:
    """After a real forward: compress the requests armed for this step (their prompt KV
    is now complete in the pages) and report kept lengths if the output is already here."""
    state = _state(runner)
    if state is None:
        return out
    for rid, cfg in (getattr(scheduler_output, ARM_ATTR, None) or {}).items():
        compress_one(runner, state, rid, cfg)
    if out is not None and state.results:
        out = _attach_results(state, out)
    return out


def _wrap_sample_tokens(cls: type) -> None:
    orig_sample = cls.sample_tokens

    def sample_tokens(self, *args, **kwargs):
        out = orig_sample(self, *args, **kwargs)
        state = _state(self)
        if state is not None and state.results and out is not None:
            out = _attach_results(state, out)
        return out

    cls.sample_tokens = sample_tokens


# ---- V1 runner (CPU runner, GPU V1) -----------------------------------------------------------


def _v1_apply_physical(runner: Any, state: WorkerCompression, num_reqs: int, total: int) -> None:
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


def _v1_compress(runner: Any, state: WorkerCompression, rid: str, cfg: dict[str, Any]) -> None:
    req = runner.requests.get(rid)
    if req is None:
        return
    row_ids = req.block_ids[0]

    def truncate(keep_blocks: int) -> None:
        del row_ids[keep_blocks:]  # in place: later appends extend this list
        index = runner.input_batch.req_id_to_index.get(rid)
        if index is not None:
            runner.input_batch.block_table.add_row(req.block_ids, index)

    state.compress_request(rid, cfg, list(row_ids), truncate)


def check_kernel_block_sizes(runner: Any, kernel_block_sizes: list[int] | None) -> None:
    """Refuse vLLM's virtual kernel-block splitting (a backend whose kernels want smaller
    pages than the KV manager's blocks: each manager block becomes several kernel blocks).
    The worker reads and compacts pages by the manager's block ids and block size, so a
    split cache would be misread. vLLM decides this in ``initialize_kv_cache``, once the
    model's attention backends are known (after the weights load, before the engine
    serves), which is the earliest it can be checked."""
    state = _state(runner)
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


def _wrap_initialize_kv_cache(
    cls: Any, attr: str, on_ready: Callable[[Any, WorkerCompression], None] | None = None
) -> None:
    """Check the kernel block sizes the runner just chose (stored on ``runner.<attr>``),
    then set compression up (layers, page layouts, attention hooks, workspace) while the
    engine starts, so a failure there stops the start instead of the first request."""
    orig = cls.initialize_kv_cache

    def initialize_kv_cache(self, *args, **kwargs):
        result = orig(self, *args, **kwargs)
        check_kernel_block_sizes(self, getattr(self, attr, None))
        profiling = kwargs.get("is_profiling", args[1] if len(args) > 1 else False)
        state = _state(self)
        if state is not None and not state.ready and not profiling:
            state.setup()
            if on_ready is not None:
                on_ready(self, state)
        return result

    cls.initialize_kv_cache = initialize_kv_cache


def patch_v1_runner() -> None:
    from vllm.v1.worker.gpu_model_runner import GPUModelRunner

    if getattr(GPUModelRunner, "_meda_patched", False):
        return
    orig_update = GPUModelRunner._update_states
    orig_prepare = GPUModelRunner._prepare_inputs
    orig_execute = GPUModelRunner.execute_model

    def _update_states(self, scheduler_output):
        state = _state(self)
        if state is not None:
            _forget_gone(state, scheduler_output)
            state.register(scheduler_output.scheduled_new_reqs)
        return orig_update(self, scheduler_output)

    def _prepare_inputs(self, scheduler_output, num_scheduled_tokens):
        result = orig_prepare(self, scheduler_output, num_scheduled_tokens)
        state = _state(self)
        if state is None:
            return result
        if not state.ready:
            state.setup()
        num_reqs = self.input_batch.num_reqs
        _v1_apply_physical(self, state, num_reqs, scheduler_output.total_num_scheduled_tokens)
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
        return _after_forward(self, scheduler_output, out, _v1_compress)

    GPUModelRunner._update_states = _update_states
    GPUModelRunner._prepare_inputs = _prepare_inputs
    GPUModelRunner.execute_model = execute_model
    _wrap_sample_tokens(GPUModelRunner)
    _wrap_initialize_kv_cache(GPUModelRunner, "_kernel_block_sizes")
    GPUModelRunner._meda_patched = True


# ---- V2 runner (GPU default; also the CPU V2 runner) ------------------------------------------


def _v2_offsets(runner: Any, state: WorkerCompression, input_batch: Any) -> torch.Tensor | None:
    """Removed tokens per batch row (device tensor), or None when no row is compressed."""
    if not state.removed:
        return None
    off = [state.removed.get(rid, 0) for rid in input_batch.req_ids[: input_batch.num_reqs]]
    if not any(off):
        return None
    return torch.tensor(off, dtype=torch.int64)


def _v2_compress(runner: Any, state: WorkerCompression, rid: str, cfg: dict[str, Any]) -> None:
    idx = runner.req_states.req_id_to_index.get(rid)
    if idx is None:
        return
    tables = runner.block_tables
    num_blocks = int(tables.num_blocks.np[0, idx])
    row_ids = tables.block_tables[0].gpu[idx, :num_blocks].tolist()

    def truncate(keep_blocks: int) -> None:
        # Cut the row's length only; its first keep_blocks ids are already the kept ones.
        # No staged write: the next step runs finish/add_requests before applying staged
        # writes, so one for this row could meet the staged write of a new request that
        # reuses the freed row, and a GPU applies staged writes in no order (silent
        # cross-request KV corruption). num_blocks.np is the host source of truth; the
        # next step's apply_staged_writes() copies it whole into the next UVA buffer of
        # its round-robin pool (never the one an in-flight step reads), and a request
        # added to this row then sets it again later, in program order.
        tables.num_blocks.np[0, idx] = keep_blocks

    state.compress_request(rid, cfg, row_ids, truncate)


def patch_v2_runner() -> None:
    from vllm.v1.worker.gpu.model_runner import GPUModelRunner

    if getattr(GPUModelRunner, "_meda_patched", False):
        return
    orig_add = GPUModelRunner.add_requests
    orig_finish = GPUModelRunner.finish_requests
    orig_prepare_attn = GPUModelRunner.prepare_attn
    orig_execute = GPUModelRunner.execute_model

    def finish_requests(self, scheduler_output):
        state = _state(self)
        if state is not None:
            _forget_gone(state, scheduler_output)
        return orig_finish(self, scheduler_output)

    def add_requests(self, scheduler_output):
        state = _state(self)
        if state is not None:
            state.register(scheduler_output.scheduled_new_reqs)
        return orig_add(self, scheduler_output)

    def prepare_attn(self, input_batch):
        state = _state(self)
        if state is None or not getattr(self, "_meda_real_step", False):
            return orig_prepare_attn(self, input_batch)
        if not state.ready:
            state.setup()
            _wrap_model_state(self, state)
        off = _v2_offsets(self, state, input_batch)
        n = input_batch.num_reqs
        step = state.plan_capture(
            list(input_batch.req_ids[:n]),
            input_batch.query_start_loc_np[: n + 1],
            self.req_states.num_computed_tokens_np[input_batch.idx_mapping_np[:n]],
            np.diff(input_batch.query_start_loc_np[: n + 1]),
        )
        capture.set_step(step)
        self._meda_offsets = off
        if off is None:
            return orig_prepare_attn(self, input_batch)
        block_tables = self.block_tables.gather_block_tables(
            input_batch.idx_mapping, num_reqs_padded=input_batch.num_reqs_after_padding
        )
        qsl = input_batch.query_start_loc_np[: n + 1]
        per_token = torch.repeat_interleave(off, torch.from_numpy(np.diff(qsl)).long())
        positions = input_batch.positions.clone()
        positions[: per_token.numel()] -= per_token.to(positions.device, positions.dtype)
        slot_mappings = self.block_tables.compute_slot_mappings(
            input_batch.idx_mapping,
            input_batch.query_start_loc,
            positions,
            num_tokens_padded=input_batch.num_tokens_after_padding,
        )
        return block_tables, slot_mappings

    def execute_model(self, scheduler_output, *args, **kwargs):
        dummy = kwargs.get("dummy_run", False) or (len(args) > 1 and args[1])
        self._meda_real_step = not dummy
        try:
            out = orig_execute(self, scheduler_output, *args, **kwargs)
        finally:
            self._meda_real_step = False
            self._meda_offsets = None
            capture.set_step(None)
        if dummy:
            return out
        return _after_forward(self, scheduler_output, out, _v2_compress)

    GPUModelRunner.finish_requests = finish_requests
    GPUModelRunner.add_requests = add_requests
    GPUModelRunner.prepare_attn = prepare_attn
    GPUModelRunner.execute_model = execute_model
    _wrap_sample_tokens(GPUModelRunner)
    _wrap_initialize_kv_cache(GPUModelRunner, "kernel_block_sizes", _wrap_model_state)
    GPUModelRunner._meda_patched = True


def _wrap_model_state(runner: Any, state: WorkerCompression) -> None:
    """Physical seq_lens for the attention metadata (V2): the runner's own InputBatch keeps
    logical lengths, which the sampler and the draft logic read after the forward."""
    import dataclasses

    model_state = runner.model_state
    orig = model_state.prepare_attn

    def prepare_attn(input_batch, *args, **kwargs):
        off = getattr(runner, "_meda_offsets", None)
        if off is not None:
            n = off.numel()
            seq_lens = input_batch.seq_lens.clone()
            seq_lens[:n] -= off.to(seq_lens.device, seq_lens.dtype)
            upper = input_batch.seq_lens_cpu_upper_bound.clone()
            upper[:n] -= off.to(upper.dtype)
            input_batch = dataclasses.replace(
                input_batch, seq_lens=seq_lens, seq_lens_cpu_upper_bound=upper
            )
        return orig(input_batch, *args, **kwargs)

    model_state.prepare_attn = prepare_attn
