"""Prometheus metrics of a stream worker (DESIGN.md §8), served on its own ``/metrics``.

Each worker owns a :class:`~prometheus_client.CollectorRegistry` (no process-global state, so
tests and the benchmark can run several workers in one process). Names carry the ``tgastream_``
prefix; label values come from closed sets (partition numbers, rejection reasons, sample kinds).
"""

from __future__ import annotations

import bisect
from collections import deque
from dataclasses import dataclass
from time import monotonic
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 0.75, 1.0, 1.5, 2.5, 5.0, 10.0)


class WorkerMetrics:
    """Every metric a stream worker exports, in one registry."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        r = self.registry = registry or CollectorRegistry()
        self.events = Counter("tgastream_events_consumed_total",
                              "Records consumed from behavior-events (valid, rejected, watermarks, re-deliveries)",
                              ["partition"], registry=r)
        self.applied = Counter("tgastream_events_applied_total", "Valid events applied to user state", registry=r)
        self.redelivered = Counter("tgastream_events_redelivered_total",
                                   "Events skipped because the user's state already holds them (offset guard)",
                                   registry=r)
        self.rejected = Counter("tgastream_events_rejected_total", "Records sent to the dead-letter topic",
                                ["reason"], registry=r)
        self.watermarks = Counter("tgastream_watermarks_total", "Watermark records applied", registry=r)
        self.events_per_s = Gauge("tgastream_events_per_second", "Records consumed per second, last 10 s",
                                  registry=r)
        self.samples = Counter("tgastream_samples_emitted_total", "Training samples emitted",
                               ["kind"], registry=r)
        self.sample_bytes = Counter("tgastream_sample_bytes_total", "Bytes of emitted samples (values)",
                                    registry=r)
        self.features = Counter("tgastream_features_published_total", "Records published to user-features",
                                registry=r)
        self.update_latency = Histogram(
            "tgastream_state_update_seconds",
            "From a batch's arrival at the worker to its users' state being durable (RocksDB + changelog)",
            buckets=LATENCY_BUCKETS, registry=r)
        self.apply_seconds = Histogram("tgastream_batch_apply_seconds", "CPU time applying one fetched batch",
                                       buckets=LATENCY_BUCKETS, registry=r)
        self.batch_records = Histogram("tgastream_batch_records", "Records per fetched batch",
                                       buckets=(1, 10, 100, 500, 1000, 2000, 5000, 10000), registry=r)
        self.persist_users = Histogram("tgastream_persist_users", "Users written per persist",
                                       buckets=(1, 10, 100, 1000, 10000, 100000), registry=r)
        self.lag = Gauge("tgastream_partition_lag", "Records behind the partition's end offset",
                         ["partition"], registry=r)
        self.pending = Gauge("tgastream_pending_windows", "Open conversion windows", ["partition"], registry=r)
        self.store_bytes = Gauge("tgastream_store_bytes", "RocksDB size (SST files + memtables)",
                                 ["partition"], registry=r)
        self.store_users = Gauge("tgastream_store_users", "Users in RocksDB (estimate)", ["partition"], registry=r)
        self.generations = Counter("tgastream_topic_generations_total",
                                   "Topics found re-created (a new generation) while running; the worker restarted on it",
                                   ["topic"], registry=r)
        self.join_retries = Counter("tgastream_worker_join_retries_total",
                                    "Start-ups that got no partition assignment within join_timeout_s and joined again",
                                    registry=r)
        self.cached_users = Gauge("tgastream_cached_users", "Users held decoded in memory", registry=r)
        self._rate = RateWindow(10.0)

    def count_records(self, partition: int, n: int) -> None:
        self.events.labels(str(partition)).inc(n)
        self.events_per_s.set(self._rate.add(n))

    def tick(self) -> None:
        """Refresh the rate while no records arrive (it decays to 0 instead of freezing)."""
        self.events_per_s.set(self._rate.add(0))

    def drop_partitions(self, partitions: set[int]) -> None:
        """Stop exporting per-partition series of partitions this worker no longer owns."""
        for gauge in (self.lag, self.pending, self.store_bytes, self.store_users):
            for p in partitions:
                try:
                    gauge.remove(str(p))
                except KeyError:
                    pass

    def serve(self, host: str, port: int) -> "MetricsServer":
        """Serve ``/metrics`` on ``host:port`` (port 0: any free port) in a daemon thread."""
        server, thread = start_http_server(port, addr=host, registry=self.registry)
        return MetricsServer(server, thread, host, server.server_port)


@dataclass
class MetricsServer:
    server: Any
    thread: Any
    host: str
    port: int

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}/metrics"

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


class RateWindow:
    """Events per second over a trailing window of wall time."""

    def __init__(self, window_s: float) -> None:
        self.window_s = window_s
        self._points: deque[tuple[float, int]] = deque()
        self._total = 0

    def add(self, n: int, now: float | None = None) -> float:
        now = monotonic() if now is None else now
        self._total += n
        self._points.append((now, self._total))
        while len(self._points) > 2 and now - self._points[0][0] > self.window_s:
            self._points.popleft()
        t0, n0 = self._points[0]
        return (self._total - n0) / (now - t0) if now > t0 else 0.0


class LatencyLog:
    """Weighted latency observations (one per batch, weighted by its records) for percentiles."""

    def __init__(self, max_points: int = 100_000) -> None:
        self._points: deque[tuple[float, int]] = deque(maxlen=max_points)

    def add(self, seconds: float, weight: int) -> None:
        if weight > 0:
            self._points.append((seconds, weight))

    def percentile(self, q: float) -> float | None:
        """The q-quantile (0..1) of latency over records, or None without data."""
        if not self._points:
            return None
        pts = sorted(self._points)
        cum, total = [], 0
        for _, w in pts:
            total += w
            cum.append(total)
        i = bisect.bisect_left(cum, q * total)
        return pts[min(i, len(pts) - 1)][0]
