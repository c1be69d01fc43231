"""OpenAI-client helpers shared by the end-to-end tests."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable

from openai import OpenAI

from tests.e2e.server import VLLMServer


def client(srv: VLLMServer) -> OpenAI:
    key = getattr(srv, "api_key", None) or "EMPTY"  # a server started with --api-key
    return OpenAI(base_url=srv.url + "/v1", api_key=key, timeout=600, max_retries=0)


def chat(srv: VLLMServer, content, max_tokens: int = 8, **extra):
    """A chat completion; ``extra``: request fields beyond OpenAI's (None values dropped)."""
    extra = {k: v for k, v in extra.items() if v is not None}
    c = client(srv)
    model = c.models.list().data[0].id
    return c.chat.completions.create(
        model=model,
        messages=[{"role": "user", "content": content}],
        max_tokens=max_tokens,
        temperature=0,
        extra_body=extra or None,
    )


class MetricPeaks:
    """Poll /metrics in a thread; keep the peak of some gauges and every sample."""

    def __init__(self, srv: VLLMServer, names: list[str], period: float = 0.02):
        self.srv, self.names, self.period = srv, names, period
        self.peaks = dict.fromkeys(names, 0.0)
        self.samples: list[dict[str, float]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                m = self.srv.metrics()
            except Exception:  # noqa: BLE001 - the server may be busy; try again
                m = {}
            sample = {n: m[n] for n in self.names if n in m}
            if sample:
                self.samples.append(sample)
            for n, v in sample.items():
                self.peaks[n] = max(self.peaks[n], v)
            time.sleep(self.period)

    def __enter__(self) -> MetricPeaks:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        time.sleep(4 * self.period)
        self._stop.set()
        self._thread.join()


def run_concurrently(fns: list[Callable[[], object]]) -> list[object]:
    """Run callables in threads; re-raise the first exception."""
    results: list[object] = [None] * len(fns)
    errors: list[BaseException] = []

    def runner(i: int, fn: Callable[[], object]) -> None:
        try:
            results[i] = fn()
        except BaseException as e:  # noqa: BLE001
            errors.append(e)

    threads = [threading.Thread(target=runner, args=(i, f)) for i, f in enumerate(fns)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise errors[0]
    return results


def wait_idle(srv: VLLMServer, timeout: float = 60) -> dict[str, float]:
    """Wait until nothing runs or waits; return the metrics then."""
    deadline = time.time() + timeout
    while True:
        m = srv.metrics()
        if (
            m.get("vllm:num_requests_running", 0) == 0
            and m.get("vllm:num_requests_waiting", 0) == 0
        ):
            return m
        if time.time() > deadline:
            return m
        time.sleep(0.2)


def usage_after_prefill(
    srv: VLLMServer,
    send: Callable[[], object],
    bound: str,
    attempts: int = 8,
    max_decoded: int = 16,
) -> float:
    """KV usage (fraction of the pool) held by one request right after its prefill, from
    the server's own ``vllm:kv_cache_usage_perc``. ``send`` runs the request alone, with
    a long enough decode that a /metrics poller sees it running.

    The scheduler's stats are taken after compression, and usage and generated tokens are
    recorded together, so the first sample with ``g >= 1`` generated tokens holds the
    compressed prompt plus ``g`` decode tokens. The request is re-sent until a sample has
    ``g <= max_decoded`` (else the sample with the fewest is used). ``bound="upper"``
    returns that sample (never less than the true value); ``bound="lower"`` subtracts the
    at most ``ceil(g / block_size)`` blocks the decode can have added (never more than the
    true value). A ratio upper/lower is therefore an upper bound on the true ratio."""
    if bound not in ("upper", "lower"):
        raise ValueError(bound)
    gen = "vllm:generation_tokens_total"
    names = ["vllm:kv_cache_usage_perc", "vllm:num_requests_running", gen]
    block_size, num_blocks = srv.cache_geometry()
    best: tuple[float, float] | None = None  # (decoded, usage)
    for _attempt in range(attempts):
        before = srv.metrics().get(gen, 0.0)
        with MetricPeaks(srv, names, period=0.002) as polled:
            send()
        for s in polled.samples:
            decoded = s.get(gen, 0.0) - before
            if s.get("vllm:num_requests_running") == 1 and decoded >= 1:
                if best is None or decoded < best[0]:
                    best = (decoded, s["vllm:kv_cache_usage_perc"])
                break
        if best is not None and best[0] <= max_decoded:
            break
    if best is None:
        raise AssertionError(f"no /metrics sample of the running request in {attempts} attempts")
    decoded, usage = best
    if bound == "lower":
        usage -= -(-int(decoded) // block_size) / num_blocks
    return usage


def skip_count(srv: VLLMServer, reason: str) -> float:
    """``meda:requests_skipped_total{reason=...}`` of a server (0 before the first one)."""
    return labelled(srv, "meda:requests_skipped_total", "reason", reason)


def labelled(srv: VLLMServer, name: str, label: str, value: str) -> float:
    """The sample of ``name`` whose ``label`` is ``value`` (0 when absent)."""
    return by_label(srv, name, label).get(value, 0.0)


def by_label(srv: VLLMServer, name: str, label: str) -> dict[str, float]:
    """Every sample of ``name`` from one scrape, by the value of its ``label``."""
    import re

    import requests

    text = requests.get(srv.url + "/metrics", timeout=10).text
    labels = r"\{[^}]*" + label + r'="([^"]*)"[^}]*\}'
    pattern = r"^" + re.escape(name) + labels + r" (\S+)$"
    return {m.group(1): float(m.group(2)) for m in re.finditer(pattern, text, re.M)}
