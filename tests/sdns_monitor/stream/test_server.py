"""The /metrics, /healthz and /readyz server: answers, a taken port, slow clients."""

from __future__ import annotations

import contextlib
import socket
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator

import pytest

from sdns_monitor.errors import ConfigError
from sdns_monitor.stream.prometheus import Metrics
from sdns_monitor.stream.server import HealthServer


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


@contextlib.contextmanager
def _half_sent_requests(port: int, n: int) -> Iterator[list[socket.socket]]:
    """`n` clients that send half a request line and then hold their socket; closed on exit."""
    clients: list[socket.socket] = []
    try:
        for _ in range(n):
            client = socket.create_connection(("127.0.0.1", port), timeout=2)
            client.sendall(b"GET /metr")
            clients.append(client)
        yield clients
    finally:
        for client in clients:
            client.close()


def test_slow_clients_hold_no_threads_and_probes_still_answer() -> None:
    server = HealthServer(Metrics(), lambda: None, lambda: None, port=0).start()
    base = f"http://127.0.0.1:{server.port}"
    before = threading.active_count()
    try:
        with _half_sent_requests(server.port, 300):
            started = time.monotonic()
            with urllib.request.urlopen(base + "/healthz", timeout=5) as r:
                assert r.status == 200 and r.read() == b"ok\n"
            assert time.monotonic() - started < 2.0
            # Every connection has been accepted by now: the probe queued behind them.
            threads = threading.active_count() - before
            assert threads < 30, f"{threads} threads for 300 half-sent requests"
            with urllib.request.urlopen(base + "/metrics", timeout=5) as r:
                assert b"sdns_ready" in r.read()
    finally:
        server.stop()


def _read_to_end(client: socket.socket) -> bytes:
    chunks = []
    while chunk := client.recv(65536):
        chunks.append(chunk)
    return b"".join(chunks)


def test_a_silent_client_is_dropped_after_the_timeout_and_a_slow_one_is_answered(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(HealthServer, "timeout_s", 0.5)
    server = HealthServer(Metrics(), lambda: None, lambda: None, port=0).start()
    address = ("127.0.0.1", server.port)
    try:
        with (
            socket.create_connection(address, timeout=3) as silent,
            socket.create_connection(address, timeout=3) as slow,
        ):
            silent.sendall(b"GET /healthz HTTP/1.1\r\n")  # and never the end of the headers
            started = time.monotonic()
            for piece in (b"GET /hea", b"lthz HTTP/1.1\r\nHost: x\r\n", b"\r\n"):
                slow.sendall(piece)
                time.sleep(0.1)
            answer = _read_to_end(slow)
            assert answer.startswith(b"HTTP/1.0 200 ") and answer.endswith(b"\r\n\r\nok\n")
            assert silent.recv(1) == b""  # closed by the server
            assert 0.4 < time.monotonic() - started < 2.0
    finally:
        server.stop()
