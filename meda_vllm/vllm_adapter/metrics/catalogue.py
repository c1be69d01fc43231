"""Every ``meda:`` metric: name, kind, labels, help, buckets (the one list)."""

from __future__ import annotations

from dataclasses import dataclass

BASE_LABELS = ("model_name", "engine")


@dataclass(frozen=True)
class MetricDef:
    """One ``meda:`` metric. ``name`` is the family name (counters get ``_total``)."""

    name: str
    kind: str  # "counter" | "gauge" | "histogram" | "info"
    help: str
    labels: tuple[str, ...] = ()
    buckets: tuple[float, ...] = ()
    admin_api: bool = False  # exposed only with the admin API on (admin.py)

    @property
    def labelnames(self) -> tuple[str, ...]:
        return BASE_LABELS + self.labels

    def sample_names(self) -> tuple[str, ...]:
        """Names of the samples this family puts on /metrics."""
        if self.kind == "counter":
            return (f"{self.name}_total",)
        if self.kind == "histogram":
            return tuple(f"{self.name}{s}" for s in ("_bucket", "_sum", "_count"))
        if self.kind == "info":
            return (f"{self.name}_info",)
        return (self.name,)


RATIO_BUCKETS = (0.05, 0.1, 0.15, 0.2, 0.25, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0)
SECONDS_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)

#: Skip reasons. Scheduler: decided before the last prefill chunk runs; worker: after it.
SCHEDULER_SKIP_REASONS = ("short_prompt", "disabled_by_request", "recompute_after_preemption")
WORKER_SKIP_REASONS = ("nothing_to_evict", "query_rows_missing", "error", "workspace")
#: Compressed, but with the policy's fallback budgets (MEDA: uniform; see policies/meda.py).
FALLBACK_REASONS = ("text_only", "vision_only", "no_cross_modal_rows")

METRICS: dict[str, MetricDef] = {
    d.name: d
    for d in (
        # worker process: the compression itself
        MetricDef(
            "meda:requests_compressed",
            "counter",
            "Requests whose prompt KV cache was compressed after prefill.",
            ("policy",),
        ),
        MetricDef(
            "meda:requests_fallback",
            "counter",
            "Compressed requests that used the policy's fallback layer budgets, by reason.",
            ("reason",),
        ),
        MetricDef(
            "meda:kv_tokens_before",
            "counter",
            "Prompt tokens of compressed requests, before compression (per layer).",
        ),
        MetricDef(
            "meda:kv_tokens_after",
            "counter",
            "Tokens kept per layer by compressed requests (physical length after compaction).",
        ),
        MetricDef(
            "meda:compression_ratio",
            "histogram",
            "Kept tokens / prompt tokens per compressed request (0.2 = five times smaller).",
            buckets=RATIO_BUCKETS,
        ),
        MetricDef(
            "meda:compression_seconds",
            "histogram",
            "Time to score, select, merge and compact one request's KV cache.",
            buckets=SECONDS_BUCKETS,
        ),
        MetricDef(
            "meda:layer_budget_ratio",
            "gauge",
            "Per-layer budget / prompt tokens of the most recently compressed request.",
            ("layer",),
        ),
        MetricDef(
            "meda:layer_kept_tokens",
            "counter",
            "Per-layer budgets summed over compressed requests (divide by kv_tokens_before).",
            ("layer",),
        ),
        MetricDef(
            "meda:group_kept_tokens",
            "counter",
            "Physical tokens held per KV cache group after compaction (the most any of its "
            "layers keeps; kv_layer_groups), summed over compressed requests (divide by "
            "kv_tokens_before; layer_kept_tokens is the logical count).",
            ("group",),
        ),
        # scheduler (EngineCore process): the memory
        MetricDef(
            "meda:requests_skipped",
            "counter",
            "Requests not compressed, by reason.",
            ("reason",),
        ),
        MetricDef(
            "meda:kv_blocks_freed",
            "counter",
            "KV cache blocks (pages) returned to vLLM's block pool by compression.",
        ),
        MetricDef(
            "meda:kv_bytes_saved",
            "counter",
            "Bytes of KV cache (all layers) returned to the block pool by compression.",
        ),
        MetricDef(
            "meda:kv_blocks_saved",
            "gauge",
            "Blocks that running compressed requests would hold more without compression.",
        ),
        MetricDef(
            "meda:kv_cache_saved_perc",
            "gauge",
            "kv_blocks_saved as a fraction of the pool (add to vllm:kv_cache_usage_perc for "
            "the usage without compression; 1 = 100 percent).",
        ),
        MetricDef(
            "meda:group_blocks_held",
            "gauge",
            "KV cache blocks (pages) held now by all running requests in each KV cache group "
            "(kv_layer_groups; a block shared through prefix caching counts once per request).",
            ("group",),
        ),
        MetricDef(
            "meda:kv_cache_blocks",
            "gauge",
            "Usable blocks in the KV cache pool (the denominator of vllm:kv_cache_usage_perc).",
        ),
        # worker process, at engine start
        MetricDef(
            "meda:workspace_bytes",
            "gauge",
            "Device memory set aside at engine start for compressing one request "
            "(kv_workspace_bytes; excluded from the KV cache unless --kv-cache-memory-bytes).",
        ),
        # API server process, admin API (admin.py)
        MetricDef(
            "meda:policy_changes",
            "counter",
            "Changes of the settings new requests get, through PUT /v1/kv/policy.",
            admin_api=True,
        ),
        MetricDef(
            "meda:kv_policy",
            "info",
            "Server-wide KV compression settings (per-request overrides may differ).",
            ("policy", "budget", "window"),
        ),
    )
}


def exposed_names(admin_api: bool = False) -> list[str]:
    """Every sample name the server can expose under ``meda:`` (with the admin API on, or
    not)."""
    return sorted(
        n for d in METRICS.values() if admin_api or not d.admin_api for n in d.sample_names()
    )
