"""Metrics and the probe server of `run`."""

from __future__ import annotations

import socket
import urllib.error
import urllib.request

import pytest

from sdns_monitor.errors import ConfigError
from sdns_monitor.stream.prometheus import HealthServer, Metrics


def test_images_per_second_is_measured_over_a_sliding_window() -> None:
    m = Metrics()
    m.scored(10, now=100.0)
    assert m.images_per_second._value.get() == 0.0  # one point is no rate yet
    m.scored(30, now=101.0)
    m.scored(30, now=102.0)
    assert m.images_per_second._value.get() == pytest.approx(30.0)
    m.scored(0, now=120.0)  # 18 s later the old points have left the 10 s window
    assert m.images_per_second._value.get() == pytest.approx(0.0)


def test_probes_answer_with_the_reason_and_metrics_are_served() -> None:
    m = Metrics()
    m.frames.labels(topic="cams").inc(3)
    reasons: dict[str, str | None] = {"alive": None, "ready": "not ready: joining"}
    server = HealthServer(m, lambda: reasons["alive"], lambda: reasons["ready"], port=0).start()
    base = f"http://127.0.0.1:{server.port}"
    try:
        with urllib.request.urlopen(base + "/healthz") as r:
            assert r.status == 200
        with pytest.raises(urllib.error.HTTPError) as exc:
            urllib.request.urlopen(base + "/readyz")
        assert exc.value.code == 503 and exc.value.read() == b"not ready: joining\n"
        reasons["ready"] = None
        with urllib.request.urlopen(base + "/readyz") as r:
            assert r.read() == b"ok\n"
        with urllib.request.urlopen(base + "/metrics") as r:
            assert 'sdns_frames_total{topic="cams"} 3.0' in r.read().decode()
    finally:
        server.stop()


def test_a_taken_port_is_a_clear_error() -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        with pytest.raises(ConfigError, match="choose another --metrics-port"):
            HealthServer(Metrics(), lambda: None, lambda: None, port=port)
