"""The Prometheus metrics of `run` (served by server.py at `/metrics`).

Each `StreamMonitor` owns a `Metrics` with its own registry, so several monitors in one process
(tests, a service embedding two) never share counters.
"""

from __future__ import annotations

import collections
import logging
import time

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

log = logging.getLogger("sdns_monitor.metrics")

_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)


class Metrics:
    """The monitor's counters and gauges (names prefixed `sdns_`)."""

    def __init__(self) -> None:
        r = self.registry = CollectorRegistry()
        self.messages = Counter("sdns_messages", "Kafka messages consumed", ["topic"], registry=r)
        self.frames = Counter("sdns_frames", "Frames scored", ["topic"], registry=r)
        self.flagged = Counter(
            "sdns_flagged_frames", "Frames flagged out-of-distribution", ["topic"], registry=r
        )
        self.alerts = Counter("sdns_alerts", "Alert records published", ["topic"], registry=r)
        self.dead_letters = Counter(
            "sdns_dead_letters", "Messages sent to the dead-letter topic", ["reason"], registry=r
        )
        self.output_failures = Counter(
            "sdns_output_failures",
            "Batches whose outputs were not acknowledged (retried, offsets not committed)",
            registry=r,
        )
        self.refused = Counter(
            "sdns_refused_records",
            "Output records refused for good (too large, invalid): dead letters are sent as "
            "references instead, other records dropped",
            ["topic"],
            registry=r,
        )
        self.reloads = Counter("sdns_model_reloads", "Model reloads", ["result"], registry=r)
        self.batch_latency = Histogram(
            "sdns_batch_latency_seconds",
            "Wall time from a micro-batch's first message to its commit",
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.images_per_second = Gauge(
            "sdns_images_per_second", "Frames scored per second over the last 10 s", registry=r
        )
        self.consumer_lag = Gauge(
            "sdns_consumer_lag", "Messages behind the high watermark", ["topic"], registry=r
        )
        self.incidents_open = Gauge("sdns_incidents_open", "Incidents open", registry=r)
        self.cameras = Gauge(
            "sdns_cameras", "Cameras (keys) whose alarm state this member keeps", registry=r
        )
        self.clamped_timestamps = Counter(
            "sdns_clamped_timestamps",
            "Frame timestamps the camera test clamped: ahead of the monitor's clock by more "
            "than max_clock_skew_s (future), or behind the camera's latest by more (past)",
            ["direction"],
            registry=r,
        )
        self.assigned_partitions = Gauge(
            "sdns_assigned_partitions", "Partitions assigned to this consumer", registry=r
        )
        self.ready = Gauge("sdns_ready", "1 when /readyz answers 200", registry=r)
        self.model_info = Gauge(
            "sdns_model_info", "The model in use (value 1)", ["name", "hash"], registry=r
        )
        self._rate_window: collections.deque[tuple[float, int]] = collections.deque()

    def set_model(self, name: str, bundle_hash: str) -> None:
        self.set_models([(name, bundle_hash)])

    def set_models(self, models: list[tuple[str, str]]) -> None:
        """The models in use (name, bundle hash): one info sample each."""
        self.model_info.clear()
        for name, bundle_hash in models:
            self.model_info.labels(name=name, hash=bundle_hash).set(1)

    def scored(self, n_frames: int, now: float | None = None, window_s: float = 10.0) -> None:
        """Record `n_frames` scored now and refresh the images/s gauge."""
        now = time.monotonic() if now is None else now
        w = self._rate_window
        w.append((now, n_frames))
        while len(w) > 1 and now - w[0][0] > window_s:
            w.popleft()
        span = now - w[0][0]
        total = sum(n for _, n in w) - (w[0][1] if len(w) > 1 else 0)
        self.images_per_second.set(total / span if span > 0 else 0.0)

    def exposition(self) -> bytes:
        return generate_latest(self.registry)
