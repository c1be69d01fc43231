"""Admin HTTP API: see and change compression while the server runs, and read what it did.

A ``vllm.endpoint_plugins`` entry point (``meda_vllm_admin``), so off unless named in
``VLLM_PLUGINS`` (vLLM loads endpoint plugins only from that allowlist, which then also
applies to the general plugins: ``VLLM_PLUGINS=meda_vllm,meda_vllm_admin``). The routes are
under ``/v1``, so vLLM's ``--api-key`` middleware guards them exactly like the OpenAI routes.

- ``GET /v1/kv/policy``: the settings new requests get (server flags, then run-time changes).
- ``PUT /v1/kv/policy``: change them for new requests (the ``kv_*`` settings a request may
  override, validated as the startup flags are); running requests keep theirs. Held by
  this API server process (``settings.change_runtime_defaults``) and folded into each new
  request's overrides (``patches/sampling_params.py``); logged, counted as
  ``meda:policy_changes_total``.
- ``GET /v1/kv/stats``: totals since start, from the same per-process numbers as ``meda:``
  on ``/metrics`` (``metrics/collector.py``).
- ``GET /v1/kv/requests/{id}``: one recent compressed request (its response ``id``, or the
  engine's id): prompt length, kept tokens per layer and per KV cache group, pages freed.
"""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Body, Request
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field

from meda_vllm.config import ConfigError, KVPolicyConfig
from meda_vllm.vllm_adapter import metrics, settings
from meda_vllm.vllm_adapter.log import logger
from meda_vllm.vllm_adapter.metrics.recording import configure

PREFIX = "/v1/kv"


class PolicyView(BaseModel):
    policy: str = Field(description="kv_policy new requests get")
    budget: float | int = Field(description="kv_budget: a ratio in (0, 1], or tokens")
    window: int = Field(description="kv_window: recent tokens always kept")
    settings: dict[str, Any] = Field(description="every setting new requests get")
    changed_at_run_time: dict[str, Any] = Field(description="what PUT changed (else {})")


class PolicyChange(BaseModel):
    """``kv_*`` settings a request may override (``--kv-policy-config`` names); the rest of
    the settings stay as they are. Validated with the startup flags' rules."""

    model_config = ConfigDict(
        extra="allow", json_schema_extra={"example": {"kv_policy": "snapkv", "kv_budget": 0.3}}
    )
    kv_policy: Any = Field(None, description="a registered policy, e.g. meda, snapkv")
    kv_budget: Any = Field(None, description="a ratio in (0, 1], or an integral token count")
    kv_window: Any = Field(None, description="recent tokens always kept")


class Latency(BaseModel):
    count: int
    mean_seconds: float | None
    p50_seconds: float | None = Field(description="estimated from the histogram's buckets")
    p90_seconds: float | None
    p99_seconds: float | None


class Stats(BaseModel):
    requests_compressed: int
    requests_skipped: dict[str, int] = Field(description="by reason")
    requests_fallback: dict[str, int] = Field(description="by reason")
    kv_tokens_before: int
    kv_tokens_after: int
    kv_blocks_freed: int
    kv_bytes_saved: int
    compression_seconds: Latency


class RequestView(BaseModel):
    request_id: str = Field(description="the engine's id of the request")
    policy: str | None = None
    prompt_tokens: int | None = None
    kept_tokens: int | None = Field(None, description="physical tokens kept per layer")
    layer_kept_tokens: list[int] | None = Field(None, description="logical, per layer")
    group_kept_tokens: list[int] | None = Field(None, description="physical, per group")
    fallback: str | None = None
    compression_seconds: float | None = None
    blocks_before: int | None = None
    blocks_after: int | None = None
    blocks_freed: int | None = None
    bytes_freed: int | None = None


def _error(status: int, message: str) -> JSONResponse:
    # FastAPI resolves the routes' annotations from this module's globals (hence the
    # imports at the top)
    kind = {400: "BadRequestError", 404: "NotFoundError"}.get(status, "Error")
    return JSONResponse({"error": {"message": message, "type": kind, "code": status}}, status)


def policy_view(server: KVPolicyConfig) -> PolicyView:
    changed = settings.runtime_defaults()
    cfg = server.merged(changed) if changed else server
    return PolicyView(
        policy=cfg.kv_policy,
        budget=cfg.kv_budget,
        window=cfg.kv_window,
        settings=cfg.model_dump(),
        changed_at_run_time=changed,
    )


def _quantile(q: float, bounds: tuple[float, ...], hist: list[float]) -> float | None:
    """Prometheus' ``histogram_quantile`` over one histogram (per-bucket counts, sum, count):
    linear within the bucket that holds the rank; the last finite bound past it."""
    count = hist[-1]
    if count <= 0:
        return None
    rank, seen, lower = q * count, 0.0, 0.0
    for bound, n in zip(bounds, hist[:-2], strict=True):
        if n > 0 and seen + n >= rank:
            return lower + (bound - lower) * (rank - seen) / n
        seen += n
        lower = bound
    return bounds[-1]


def stats_from(merged: dict[tuple[str, Any], Any]) -> Stats:
    """Totals over every label but the reason (engines, models, policies summed)."""

    def total(name: str) -> int:
        return int(sum(v for (n, _), v in merged.items() if n == name))

    def by_reason(name: str) -> dict[str, int]:
        out: dict[str, int] = {}
        for (n, key), v in merged.items():
            if n == name:
                reason = dict(key).get("reason", "")
                out[reason] = out.get(reason, 0) + int(v)
        return out

    bounds = metrics.METRICS["meda:compression_seconds"].buckets
    hist = [0.0] * (len(bounds) + 2)
    for (n, _), h in merged.items():
        if n == "meda:compression_seconds":
            hist = [a + b for a, b in zip(hist, h, strict=True)]
    count = int(hist[-1])
    latency = Latency(
        count=count,
        mean_seconds=hist[-2] / count if count else None,
        p50_seconds=_quantile(0.5, bounds, hist),
        p90_seconds=_quantile(0.9, bounds, hist),
        p99_seconds=_quantile(0.99, bounds, hist),
    )
    return Stats(
        requests_compressed=total("meda:requests_compressed"),
        requests_skipped=by_reason("meda:requests_skipped"),
        requests_fallback=by_reason("meda:requests_fallback"),
        kv_tokens_before=total("meda:kv_tokens_before"),
        kv_tokens_after=total("meda:kv_tokens_after"),
        kv_blocks_freed=total("meda:kv_blocks_freed"),
        kv_bytes_saved=total("meda:kv_bytes_saved"),
        compression_seconds=latency,
    )


def find_request(snapshots: list[dict[str, Any]], request_id: str) -> RequestView | None:
    """The records of one request from every process, by the engine's id or by the id the
    client saw (the engine's without vLLM's ``-xxxxxxxx`` suffix)."""
    found: dict[str, dict[str, Any]] = {}
    for snap in snapshots:
        for rid, record in (snap.get("requests") or {}).items():
            if request_id in (rid, rid.rsplit("-", 1)[0]):
                found.setdefault(rid, {}).update(record)
    if not found:
        return None
    rid = sorted(found)[-1]
    return RequestView(request_id=rid, **found[rid])


class AdminPlugin:
    """The ``vllm.endpoint_plugins`` entry point (vLLM's ``EndpointPlugin`` protocol)."""

    name = "meda_vllm_admin"
    required_tasks = None

    def attach_router(self, app: Any) -> None:
        router = APIRouter(prefix=PREFIX, tags=["meda-vllm"])

        def server(request: Request) -> KVPolicyConfig | None:
            return getattr(request.app.state, "meda_server_config", None)

        @router.get("/policy", response_model=PolicyView)
        def get_policy(request: Request):
            cfg = server(request)
            if cfg is None:
                return _error(400, "KV compression is not set up on this server")
            return policy_view(cfg)

        @router.put("/policy", response_model=PolicyView)
        def put_policy(request: Request, change: PolicyChange = Body(...)):  # noqa: B008
            cfg = server(request)
            if cfg is None or cfg.kv_policy == "none":
                return _error(400, "this server runs without KV compression (--kv-policy none)")
            given = {k: v for k, v in change.model_dump().items() if v is not None}
            if not given:
                return _error(400, 'no setting given (e.g. {"kv_budget": 0.3})')
            try:
                settings.change_runtime_defaults(cfg, given)
            except ConfigError as e:
                return _error(400, str(e))
            logger.info("meda-vllm: KV policy for new requests changed: %s", given)
            configure(request.app.state.meda_vllm_config).inc("meda:policy_changes")
            return policy_view(cfg)

        @router.get("/stats", response_model=Stats)
        def get_stats():
            snaps = metrics.read_snapshots(metrics.recorder().directory)
            return stats_from(metrics.merge_snapshots(snaps))

        @router.get("/requests/{request_id}", response_model=RequestView)
        def get_request(request_id: str):
            snaps = metrics.read_snapshots(metrics.recorder().directory)
            found = find_request(snaps, request_id)
            if found is None:
                return _error(404, f"no recent compressed request {request_id!r}")
            return found

        app.include_router(router)

    async def init_state(self, engine_client: Any, state: Any, args: Any) -> None:
        vllm_config = getattr(engine_client, "vllm_config", None)
        state.meda_vllm_config = vllm_config
        state.meda_server_config = (
            settings.server_config(vllm_config) if vllm_config is not None else None
        )
        if vllm_config is not None and state.meda_server_config.kv_policy != "none":
            configure(vllm_config).inc("meda:policy_changes", 0)  # the series from startup
        logger.info("meda-vllm: admin API on %s (policy, stats, requests)", PREFIX)
