"""Worker side: one runner's compression state, and the compression of one request.

Per compressed request (both runners; their vLLM patches are ``patches/v1_runner.py`` and
``patches/v2_runner.py``, what they share is ``runner.py``):

* after the forward of the step that carried its last prefill chunk, the KV of
  every layer is scored, selected (and merged) by the core, and compacted in
  place into the request's leading slots; the request's block-table row is
  truncated to the kept blocks (the scheduler frees the same tail);
* from the next step on, ``removed = N - P`` is subtracted from the positions
  used for the slot mapping and from ``seq_lens`` (physical), while the
  positions fed to RoPE stay logical, so decoding continues at position N.

With ``kv_layer_groups`` > 1 each KV cache group (a run of consecutive layers with its
own block-table row) keeps its own physical length ``P_g``, the largest kept length of
its layers: rows, truncation, ``removed`` and the reported lengths are per group.
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
from meda_vllm.vllm_adapter import capture, memory, metrics, plan_dump, settings
from meda_vllm.vllm_adapter.log import logger
from meda_vllm.vllm_adapter.protocol import RECOMPUTE, cdiv
from meda_vllm.workspace import WorkspaceTooSmall


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
    group_kept: tuple[int, ...] = ()  # physical length held by each KV cache group


@dataclass
class WorkerCompression:
    runner: Any
    server: KVPolicyConfig
    layer_names: list[str] = field(default_factory=list)
    attention_layers: dict[str, Any] = field(default_factory=dict)  # by name, in layer order
    layouts: list[PagedKVLayout] = field(default_factory=list)
    layer_groups: list[int] = field(default_factory=list)  # KV cache group of each layer
    block_size: int = 0
    ready: bool = False
    infos: dict[str, RequestInfo] = field(default_factory=dict)
    captures: dict[str, capture.RequestCapture] = field(default_factory=dict)
    removed: dict[str, tuple[int, ...]] = field(default_factory=dict)  # N - P_g per group
    # Preempted and not yet finished: if they come back they are recomputed, never
    # compressed (the scheduler arms only requests with num_preemptions == 0).
    preempted: set[str] = field(default_factory=set)
    results: dict[str, tuple[int, Any]] = field(default_factory=dict)  # (N, P_g's | RECOMPUTE)
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
        self.attention_layers = {n: layers[n] for n in self.layer_names}
        self.layer_groups = _layer_groups(self.runner, self.layer_names)
        self.workspace_bytes = memory.resolve_workspace(self.runner.vllm_config, self.server)
        metrics.on_workspace(self.runner.vllm_config, self.workspace_bytes)
        self.ready = True
        logger.info(
            "meda-vllm: worker ready: %d layers in %d KV cache group(s), block size %d, backend %s",
            len(self.layer_names),
            self.num_groups,
            self.block_size,
            type(layers[self.layer_names[0]].impl).__name__,
        )

    @property
    def num_groups(self) -> int:
        return max(self.layer_groups, default=0) + 1

    def removed_in(self, rid: str, group: int) -> int:
        """Tokens of ``rid`` no longer held by KV cache group ``group`` (0: uncompressed)."""
        removed = self.removed.get(rid)
        return removed[group] if removed is not None else 0

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
        row_ids: list[list[int]],
        truncate: Callable[[list[int]], None],
    ) -> None:
        """Compress one request whose prompt KV is complete in the pages ``row_ids[g]`` of
        each KV cache group ``g``, with the settings resolved when it was added
        (``RequestInfo.cfg``, as the scheduler resolved them to arm it).

        ``truncate(keep_blocks)`` shortens the request's block-table row of each group to
        ``keep_blocks[g]`` blocks (runner-specific).
        """
        info = self.infos.get(rid)
        cap = self.captures.pop(rid, None)
        if info is None or cap is None:
            return
        cfg = info.cfg
        n = info.n_prompt
        if len(cap.rows) != len(self.layer_names):
            logger.warning("meda-vllm: %s: query rows missing, not compressed", rid)
            metrics.on_skip("query_rows_missing", self.runner.vllm_config)
            return
        t0 = time.perf_counter()
        device = self.cache(0).device
        if len(row_ids) != self.num_groups:
            logger.warning("meda-vllm: %s: %d block-table rows, not compressed", rid, len(row_ids))
            metrics.on_skip("error", self.runner.vllm_config)
            return
        group_rows = [
            torch.tensor(ids[: cdiv(n, self.block_size)], dtype=torch.int32, device=device)
            for ids in row_ids
        ]
        layer_groups = self.layer_groups or [0] * len(self.layer_names)
        rows = [group_rows[g] for g in layer_groups]
        query_pos = cap.positions.to(device)
        vis = info.vis.to(device) if info.vis is not None else None
        fast = self.use_paged_kernels(device)
        caches = [self.cache(layer) for layer in range(len(self.layer_names))]
        try:
            plan = plan_paged_request(
                caches,
                self.layouts,
                rows,
                n,
                lambda layer: cap.rows[layer].to(device).transpose(0, 1),  # [H, R, D]
                query_pos,
                vis,
                cfg,
                fast=fast,
                workspace=self.workspace_bytes,
                groups=layer_groups,
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
        kept = group_lengths(plan, layer_groups, self.num_groups)
        if plan_dump.directory() is not None:
            plan_dump.write(rid, _dump_record(rid, info, cfg, plan))
        try:
            apply_plan(caches, self.layouts, rows, plan)
            truncate([cdiv(p, self.block_size) for p in kept])
        except Exception:  # noqa: BLE001 - the pages may be half rewritten: recompute
            logger.exception(
                "meda-vllm: %s: compaction failed; the request is recomputed uncompressed", rid
            )
            metrics.on_skip("error", self.runner.vllm_config)
            self.results[rid] = (n, RECOMPUTE)
            return
        self.removed[rid] = tuple(n - p for p in kept)
        self.results[rid] = (n, kept)
        seconds = time.perf_counter() - t0
        stats = CompressionStats(
            rid, n, plan.kept_tokens, list(plan.layer_budgets), seconds, plan.fallback, kept
        )
        metrics.on_compressed(self.runner.vllm_config, stats, cfg.kv_policy)
        logger.debug("meda-vllm: %s: %d -> %s tokens in %.1f ms", rid, n, kept, seconds * 1e3)

    @staticmethod
    def use_paged_kernels(device: torch.device) -> bool:
        """Score/entropy straight from the pages with Triton (GPU, or forced for tests)."""
        return resolve_backend(None, device) == "triton"


def group_lengths(plan: Any, layer_groups: list[int], num_groups: int) -> tuple[int, ...]:
    """The physical length of each KV cache group: the most slots one of its layers keeps."""
    kept = [0] * num_groups
    for lp, group in zip(plan.layers, layer_groups, strict=True):
        kept[group] = max(kept[group], lp.kept.shape[1])
    return tuple(kept)


def _layer_groups(runner: Any, layer_names: list[str]) -> list[int]:
    """The KV cache group of each layer, checked to be runs of consecutive layers."""
    where = {
        name: gid
        for gid, group in enumerate(runner.kv_cache_config.kv_cache_groups)
        for name in group.layer_names
    }
    missing = [n for n in layer_names if n not in where]
    if missing:
        raise RuntimeError(f"meda-vllm: layers {missing} are in no KV cache group")
    groups = [where[n] for n in layer_names]
    if groups != sorted(groups) or sorted(set(groups)) != list(range(len(set(groups)))):
        raise RuntimeError(f"meda-vllm: KV cache groups are not runs of layers: {groups}")
    return groups


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
