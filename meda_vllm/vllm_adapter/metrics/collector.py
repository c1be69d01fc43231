"""API server side: read the processes' snapshots at scrape time and sum them."""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

from meda_vllm.vllm_adapter.metrics.catalogue import BASE_LABELS, METRICS
from meda_vllm.vllm_adapter.metrics.recording import ENV_DIR, LabelKey, label_key


def read_snapshots(directory: str | os.PathLike | None) -> list[dict[str, Any]]:
    if not directory or not os.path.isdir(directory):
        return []
    out = []
    for path in sorted(Path(directory).glob("p*.json")):
        try:
            out.append(json.loads(path.read_text()))
        except (OSError, ValueError):
            continue  # removed meanwhile, or not ours
    return out


def merge_snapshots(snapshots: Iterable[dict[str, Any]]) -> dict[tuple[str, LabelKey], Any]:
    """Sum counters and histograms over processes; gauges and infos have one producer."""
    merged: dict[tuple[str, LabelKey], Any] = {}
    for snap in snapshots:
        for s in snap.get("series", ()):
            d = METRICS.get(s.get("name"))
            if d is None:
                continue
            key = (d.name, label_key(s.get("labels", {})))
            if d.kind == "histogram":
                h = s.get("hist") or []
                if len(h) != len(d.buckets) + 2:
                    continue
                prev = merged.get(key)
                merged[key] = h if prev is None else [a + b for a, b in zip(prev, h, strict=True)]
            elif d.kind in ("counter", "gauge"):
                merged[key] = merged.get(key, 0.0) + float(s.get("value", 0.0))
            else:
                merged[key] = 1.0
    return merged


class MedaCollector:
    """prometheus_client collector over the snapshots in ``directory`` (default: the env)."""

    def __init__(self, directory: str | os.PathLike | None = None):
        self._directory = directory

    @property
    def directory(self) -> str | None:
        if self._directory is not None:
            return str(self._directory)
        return os.environ.get(ENV_DIR)

    def describe(self) -> Iterator[Any]:
        yield from _families({})

    def collect(self) -> Iterator[Any]:
        # Only families with samples: with --kv-policy none, /metrics stays stock vLLM's.
        for fam in _families(merge_snapshots(read_snapshots(self.directory))):
            if fam.samples:
                yield fam


def _families(merged: dict[tuple[str, LabelKey], Any]) -> Iterator[Any]:
    from prometheus_client.core import (
        CounterMetricFamily,
        GaugeMetricFamily,
        HistogramMetricFamily,
        InfoMetricFamily,
    )

    by_name: dict[str, list[tuple[LabelKey, Any]]] = {}
    for (name, key), value in sorted(merged.items()):
        by_name.setdefault(name, []).append((key, value))
    for d in METRICS.values():
        names = list(d.labelnames)
        if d.kind == "counter":
            fam = CounterMetricFamily(d.name, d.help, labels=names)
        elif d.kind == "gauge":
            fam = GaugeMetricFamily(d.name, d.help, labels=names)
        elif d.kind == "histogram":
            fam = HistogramMetricFamily(d.name, d.help, labels=names)
        else:
            fam = InfoMetricFamily(d.name, d.help, labels=list(BASE_LABELS))
        for key, value in by_name.get(d.name, ()):
            labels = dict(key)
            if set(labels) != set(names):
                continue
            values = [labels[n] for n in names]
            if d.kind == "histogram":
                cumulative, buckets = 0.0, []
                for bound, count in zip(d.buckets, value[:-2], strict=True):
                    cumulative += count
                    buckets.append((_le(bound), cumulative))
                buckets.append(("+Inf", value[-1]))
                fam.add_metric(values, buckets, value[-2])
            elif d.kind == "info":
                fam.add_metric([labels[n] for n in BASE_LABELS], {n: labels[n] for n in d.labels})
            else:
                fam.add_metric(values, value)
        yield fam


def _le(bound: float) -> str:
    from prometheus_client.utils import floatToGoString

    return floatToGoString(bound)


def attach_collector(registry: Any) -> None:
    """Add a MedaCollector to a prometheus_client registry (once per registry)."""
    if getattr(registry, "_meda_collector", None) is not None:
        return
    collector = MedaCollector()
    registry.register(collector)
    registry._meda_collector = collector
