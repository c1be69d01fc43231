"""This process's numbers (``Recorder``) and their snapshot file, written by a daemon
thread; the snapshot folder is settled once per process tree (``init_process``)."""

from __future__ import annotations

import atexit
import contextlib
import json
import math
import multiprocessing
import os
import shutil
import tempfile
import threading
import time
import uuid
from collections import OrderedDict
from typing import Any

from meda_vllm.vllm_adapter.log import logger
from meda_vllm.vllm_adapter.metrics.catalogue import METRICS

ENV_DIR = "MEDA_VLLM_METRICS_DIR"
FLUSH_SECONDS = 0.2
#: per-request records kept per process for ``GET /v1/kv/requests/{id}`` (oldest dropped)
RECENT_REQUESTS = 256

LabelKey = tuple[tuple[str, str], ...]


def label_key(labels: dict[str, Any]) -> LabelKey:
    return tuple(sorted((k, str(v)) for k, v in labels.items()))


class Recorder:
    """This process's numbers; ``flush()`` writes them to ``<directory>/p<pid>.json``."""

    def __init__(self, directory: str | None, base: dict[str, str] | None = None):
        self.directory = directory
        self.base: dict[str, str] = dict(base or {})
        self.pid = os.getpid()
        self._lock = threading.Lock()
        self._counters: dict[tuple[str, LabelKey], float] = {}
        self._gauges: dict[tuple[str, LabelKey], float] = {}
        self._hists: dict[tuple[str, LabelKey], list[float]] = {}  # buckets..., sum, count
        self._infos: set[tuple[str, LabelKey]] = set()
        self._requests: OrderedDict[str, dict[str, Any]] = OrderedDict()
        self._dirty = threading.Event()
        self._thread: threading.Thread | None = None

    def _series(self, name: str, kind: str, labels: dict[str, Any]) -> tuple[str, LabelKey]:
        d = METRICS[name]
        if d.kind != kind:
            raise ValueError(f"{name} is a {d.kind}, not a {kind}")
        full = {**self.base, **labels}
        if set(full) != set(d.labelnames):
            raise ValueError(f"{name} takes labels {d.labelnames}, got {sorted(full)}")
        return name, label_key(full)

    def inc(self, name: str, amount: float = 1.0, **labels: Any) -> None:
        s = self._series(name, "counter", labels)
        with self._lock:
            self._counters[s] = self._counters.get(s, 0.0) + amount
        self._touch()

    def set(self, name: str, value: float, **labels: Any) -> None:
        s = self._series(name, "gauge", labels)
        with self._lock:
            self._gauges[s] = float(value)
        self._touch()

    def observe(self, name: str, value: float, **labels: Any) -> None:
        s = self._series(name, "histogram", labels)
        bounds = METRICS[name].buckets
        with self._lock:
            h = self._hists.setdefault(s, [0.0] * (len(bounds) + 2))
            if not math.isnan(value):
                for i, b in enumerate(bounds):
                    if value <= b:
                        h[i] += 1
                        break
                h[-2] += value
                h[-1] += 1
        self._touch()

    def info(self, name: str, **labels: Any) -> None:
        s = self._series(name, "info", labels)
        with self._lock:
            self._infos.add(s)
        self._touch()

    def note_request(self, request_id: str, **fields: Any) -> None:
        """What this process knows of one recent request (merged by id in the API server)."""
        with self._lock:
            record = self._requests.pop(request_id, {})
            record.update(fields)
            self._requests[request_id] = record
            while len(self._requests) > RECENT_REQUESTS:
                self._requests.popitem(last=False)
        self._touch()

    def snapshot(self) -> dict[str, Any]:
        with self._lock:
            series = [
                {"name": n, "labels": dict(k), "value": v} for (n, k), v in self._counters.items()
            ]
            series += [
                {"name": n, "labels": dict(k), "value": v} for (n, k), v in self._gauges.items()
            ]
            series += [
                {"name": n, "labels": dict(k), "hist": list(h)} for (n, k), h in self._hists.items()
            ]
            series += [{"name": n, "labels": dict(k), "value": 1.0} for n, k in self._infos]
            requests = {rid: dict(r) for rid, r in self._requests.items()}
        return {"version": 1, "pid": self.pid, "series": series, "requests": requests}

    def flush(self) -> None:
        if not self.directory:
            return
        try:
            os.makedirs(self.directory, exist_ok=True)
            path = os.path.join(self.directory, f"p{self.pid}.json")
            tmp = f"{path}.{threading.get_ident()}.tmp"
            with open(tmp, "w") as f:
                json.dump(self.snapshot(), f, separators=(",", ":"))
            os.replace(tmp, path)
        except OSError as e:  # metrics must never take the engine down
            logger.warning("meda-vllm: could not write metrics to %s: %s", self.directory, e)

    def _touch(self) -> None:
        if not self.directory:
            return
        self._dirty.set()
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="meda-metrics", daemon=True)
            self._thread.start()
            atexit.register(self.flush)

    def _run(self) -> None:
        while True:
            self._dirty.wait()
            time.sleep(FLUSH_SECONDS)  # coalesce a burst of updates into one write
            self._dirty.clear()
            self.flush()


_RECORDER: Recorder | None = None


def recorder() -> Recorder:
    """This process's recorder (a fresh one after a fork)."""
    global _RECORDER
    if _RECORDER is None or _RECORDER.pid != os.getpid():
        _RECORDER = Recorder(os.environ.get(ENV_DIR))
    return _RECORDER


def configure(vllm_config: Any) -> Recorder:
    rec = recorder()
    if not rec.base:
        model = getattr(getattr(vllm_config, "model_config", None), "served_model_name", None)
        if isinstance(model, (list, tuple)):
            model = model[0] if model else None
        parallel = getattr(vllm_config, "parallel_config", None)
        rec.base = {
            "model_name": str(model or "unknown"),
            "engine": str(getattr(parallel, "data_parallel_rank", 0) or 0),
        }
    return rec


def init_process() -> None:
    """Called by ``register()`` in every vLLM process: settle the snapshot folder (see top)."""
    if multiprocessing.parent_process() is not None and os.environ.get(ENV_DIR):
        return  # a vLLM child: share the folder of the process that started us
    path = os.path.join(
        tempfile.gettempdir(), f"meda-vllm-metrics-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    )
    os.environ[ENV_DIR] = path
    atexit.register(_remove_dir, path, os.getpid())


def _remove_dir(path: str, owner: int) -> None:
    if os.getpid() == owner:  # not in forked children, which inherit atexit handlers
        with contextlib.suppress(OSError):
            shutil.rmtree(path, ignore_errors=True)
