"""Prometheus metrics and the `/metrics`, `/healthz`, `/readyz` endpoints of `run`.

Each `StreamMonitor` owns a `Metrics` with its own registry, so several monitors in one process
(tests, a service embedding two) never share counters. `HealthServer` is a small threaded HTTP
server from the standard library; it binds 127.0.0.1 unless told otherwise.

- `/healthz`: 200 while the loop is making progress (it polled within `stall_s`), else 503.
- `/readyz`: 200 once the model is loaded and the consumer has joined its group (even with no
  partitions assigned), and while outputs are being delivered; 503 with the reason otherwise.
"""

from __future__ import annotations

import collections
import logging
import threading
import time
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

from sdns_monitor.errors import ConfigError

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


class HealthServer:
    """Serves `/metrics`, `/healthz` and `/readyz` on a background thread."""

    def __init__(
        self,
        metrics: Metrics,
        alive: Callable[[], str | None],
        ready: Callable[[], str | None],
        host: str = "127.0.0.1",
        port: int = 9108,
    ) -> None:
        """`alive` and `ready` return None when healthy, else the reason (served with 503)."""

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                path = self.path.split("?", 1)[0]
                if path == "/metrics":
                    self._send(200, metrics.exposition(), CONTENT_TYPE_LATEST)
                elif path in ("/healthz", "/readyz"):
                    problem = (alive if path == "/healthz" else ready)()
                    body = b"ok\n" if problem is None else (problem + "\n").encode()
                    self._send(200 if problem is None else 503, body, "text/plain; charset=utf-8")
                else:
                    self._send(404, b"not found: try /metrics, /healthz or /readyz\n", "text/plain")

            def _send(self, code: int, body: bytes, content_type: str) -> None:
                self.send_response(code)
                self.send_header("Content-Type", content_type)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, format: str, *args: object) -> None:
                pass  # probes every few seconds would flood the log

        try:
            self._server = ThreadingHTTPServer((host, port), Handler)
        except OSError as exc:
            raise ConfigError(
                f"cannot serve metrics on {host}:{port} ({exc.strerror}); "
                "choose another --metrics-port, 0 for a free one, or off"
            ) from None
        self._server.daemon_threads = True
        self.host, self.port = host, self._server.server_address[1]
        self._thread = threading.Thread(
            target=self._server.serve_forever, name="sdns-metrics", daemon=True
        )

    def start(self) -> HealthServer:
        self._thread.start()
        log.info("metrics on http://%s:%d/metrics (also /healthz, /readyz)", self.host, self.port)
        return self

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()
