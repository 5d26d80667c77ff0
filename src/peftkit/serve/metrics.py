"""Prometheus metrics of one server: what the engine reports as it schedules, and the adapter store's cache
counters read at scrape time. Each `ServeMetrics` has its own registry, so two servers in one process (tests,
replicas) never share counts.

Tokens/s is `rate(peftkit_generated_tokens_total[1m])`; TPOT is the gap between consecutive tokens of a request.
"""
from __future__ import annotations

from collections.abc import Iterator
from typing import Any, Protocol

from peftkit.models import require_extra

require_extra("prometheus_client", "serve")

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest  # noqa: E402
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric  # noqa: E402
from prometheus_client.registry import Collector  # noqa: E402

# Seconds: a decode step on a CPU takes tens of milliseconds, a prefill behind a long queue seconds.
TTFT_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
TPOT_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)


class _HasStats(Protocol):
    def stats(self) -> dict[str, int]: ...

    def names(self) -> list[str]: ...


class _StoreCollector(Collector):
    """The store's counters as they are at scrape time (the store counts; nothing is copied in between)."""

    def __init__(self, store: _HasStats) -> None:
        self.store = store

    def collect(self) -> Iterator[Metric]:
        stats = self.store.stats()
        for key, help_text in (("hits", "requests whose adapter was already loaded"),
                               ("misses", "requests that had to wait for their adapter to load"),
                               ("evictions", "adapters unloaded to make room (least recently used)")):
            yield CounterMetricFamily(f"peftkit_adapter_cache_{key}", help_text, value=stats[key])
        yield GaugeMetricFamily("peftkit_adapters_loaded", "adapters in memory", value=stats["loaded"])
        yield GaugeMetricFamily("peftkit_adapters_loaded_bytes", "bytes of the adapters in memory",
                                value=stats["loaded_bytes"])
        yield GaugeMetricFamily("peftkit_adapters_registered", "adapters registered (loaded or not)",
                                value=len(self.store.names()))


class ServeMetrics:
    """Counters, gauges and histograms the engine updates; `render()` is the /metrics body."""

    def __init__(self, store: _HasStats | None = None) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        own: dict[str, Any] = {"registry": self.registry}
        self._queued = Counter("peftkit_requests_queued", "requests accepted into the queue", **own)
        self._started = Counter("peftkit_requests_started", "requests that joined the running batch", **own)
        self._finished = Counter("peftkit_requests_finished", "requests that ended, by reason", ["reason"], **own)
        self._tokens = Counter("peftkit_generated_tokens", "output tokens generated", **own)
        self._ttft = Histogram("peftkit_time_to_first_token_seconds", "from queued to the first output token",
                               buckets=TTFT_BUCKETS, **own)
        self._tpot = Histogram("peftkit_time_per_output_token_seconds",
                               "gap between consecutive output tokens of one request", buckets=TPOT_BUCKETS, **own)
        self._running = Gauge("peftkit_running_requests", "requests in the running batch", **own)
        self._queue = Gauge("peftkit_queued_requests", "requests waiting in the queue", **own)
        self._refused = Counter("peftkit_requests_refused", "requests answered with an error, by its code",
                                ["code"], **own)
        if store is not None:
            self.registry.register(_StoreCollector(store))

    def queued(self) -> None:
        self._queued.inc()

    def started(self) -> None:
        self._started.inc()

    def first_token(self, seconds: float) -> None:
        self._ttft.observe(seconds)

    def token_gap(self, seconds: float) -> None:
        self._tpot.observe(seconds)

    def tokens(self, n: int) -> None:
        self._tokens.inc(n)

    def finished(self, reason: str) -> None:
        self._finished.labels(reason=reason).inc()

    def set_running(self, n: int) -> None:
        self._running.set(n)

    def set_queue(self, n: int) -> None:
        self._queue.set(n)

    def refused(self, code: str) -> None:
        """An error answer (the HTTP layer counts these: queue full, unknown adapter, bad field, ...)."""
        self._refused.labels(code=code).inc()

    def render(self) -> bytes:
        """The Prometheus text exposition of every metric."""
        return generate_latest(self.registry)
