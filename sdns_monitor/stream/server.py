"""The `/metrics`, `/healthz` and `/readyz` server of `run`.

`HealthServer` answers with the standard library's HTTP request handler, on a fixed number of
threads whatever clients do (slow ones are timed out, not given a thread each); it binds
127.0.0.1 unless told otherwise.

- `/healthz`: 200 while every worker thread lives and the loop comes round, else 503.
- `/readyz`: 200 once the model is loaded and the consumer has joined its group (even with no
  partitions assigned), while outputs are delivered and the pipeline moves; 503 with the
  reason otherwise (health.Status).
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import logging
import queue
import selectors
import socket
import threading
import time
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler
from typing import Any, cast

from prometheus_client.exposition import CONTENT_TYPE_LATEST

from sdns_monitor.errors import ConfigError
from sdns_monitor.stream.prometheus import Metrics

log = logging.getLogger("sdns_monitor.metrics")


class HealthServer:
    """Serves `/metrics`, `/healthz` and `/readyz` on a background thread.

    A slow or silent client costs a socket, never a thread: one thread reads every connection's
    request without blocking, and hands only complete requests to a few handler threads. A
    client gets `timeout_s` to send its request and again to take the answer; beyond
    `max_connections` still sending, the oldest is closed to admit the newest (so a probe gets
    in however many stalled clients there are); a request while every handler is busy and
    `queue_size` more wait gets 503 at once.
    """

    timeout_s = 5.0
    max_connections = 128
    workers = 4
    queue_size = 16
    max_request_bytes = 16384  # request line and headers; these endpoints take no body

    def __init__(
        self,
        metrics: Metrics,
        alive: Callable[[], str | None],
        ready: Callable[[], str | None],
        host: str = "127.0.0.1",
        port: int = 9108,
    ) -> None:
        """`alive` and `ready` return None when healthy, else the reason (served with 503)."""
        timeout_s = self.timeout_s

        class Handler(BaseHTTPRequestHandler):
            def setup(self) -> None:
                # The request arrives as (socket, the bytes the reader thread has read).
                self.connection, head = self.request
                self.connection.settimeout(timeout_s)  # for writing the answer
                self.rfile = io.BytesIO(head)
                self.wfile = _SocketWriter(self.connection)

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

        self._handler = Handler
        self._listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        try:
            self._listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            self._listener.bind((host, port))
            self._listener.listen(self.max_connections)
        except OSError as exc:
            self._listener.close()
            raise ConfigError(
                f"cannot serve metrics on {host}:{port} ({exc.strerror}); "
                "choose another --metrics-port, 0 for a free one, or off"
            ) from None
        self._listener.setblocking(False)
        self.host, self.port = host, self._listener.getsockname()[1]
        self._jobs: queue.Queue[tuple[socket.socket, Any, bytes] | None] = queue.Queue(
            self.queue_size
        )
        self._stopping = threading.Event()
        self._thread = threading.Thread(
            target=self._read_requests, name="sdns-metrics", daemon=True
        )
        self._handlers = [
            threading.Thread(target=self._handle_requests, name=f"sdns-metrics-{i}", daemon=True)
            for i in range(self.workers)
        ]

    def start(self) -> HealthServer:
        for thread in [self._thread, *self._handlers]:
            thread.start()
        log.info("metrics on http://%s:%d/metrics (also /healthz, /readyz)", self.host, self.port)
        return self

    def stop(self) -> None:
        """Stop accepting, drop the connections not yet answered; answers being written finish
        (within `timeout_s`) on their daemon threads."""
        self._stopping.set()
        if self._thread.is_alive():
            self._thread.join()
        self._listener.close()
        while True:
            try:
                job = self._jobs.get_nowait()
            except queue.Empty:
                break
            if job is not None:
                job[0].close()
        with contextlib.suppress(queue.Full):  # only when stop() is called over and over
            for _ in self._handlers:
                self._jobs.put_nowait(None)

    # ------------------------------------------------------------------ the reader thread
    def _read_requests(self) -> None:
        """Accept connections and read their requests without blocking; hand complete ones
        to the handler threads. Connections are kept in arrival order, so the oldest is the
        first to time out and the first to go when there are too many."""
        pending: dict[socket.socket, _Pending] = {}
        with selectors.DefaultSelector() as selector:
            selector.register(self._listener, selectors.EVENT_READ)
            while not self._stopping.is_set():
                now = time.monotonic()
                wait = _POLL_S
                if pending:
                    wait = min(wait, max(0.0, next(iter(pending.values())).deadline - now))
                for key, _ in selector.select(wait):
                    conn = cast(socket.socket, key.fileobj)
                    try:
                        if conn is self._listener:
                            self._accept(selector, pending)
                        elif conn in pending:  # not dropped by an earlier event of this round
                            self._receive(selector, pending, conn)
                    except Exception:  # this thread is the whole server: it must not die
                        log.exception("metrics: serving a connection failed")
                        if conn in pending:
                            self._drop(selector, pending, conn)
                now = time.monotonic()
                while pending and next(iter(pending.values())).deadline <= now:
                    self._drop(selector, pending, next(iter(pending)))
            for conn in list(pending):
                self._drop(selector, pending, conn)

    def _accept(
        self, selector: selectors.BaseSelector, pending: dict[socket.socket, _Pending]
    ) -> None:
        for _ in range(self.max_connections):  # drain a burst, but come back to the readers
            try:
                conn, address = self._listener.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:  # out of file descriptors, a reset before accept
                log.debug("metrics: accept failed: %s", exc)
                return
            if len(pending) >= self.max_connections:
                self._drop(selector, pending, next(iter(pending)))
            conn.setblocking(False)
            pending[conn] = _Pending(address, time.monotonic() + self.timeout_s)
            selector.register(conn, selectors.EVENT_READ)

    def _receive(
        self,
        selector: selectors.BaseSelector,
        pending: dict[socket.socket, _Pending],
        conn: socket.socket,
    ) -> None:
        request = pending[conn]
        try:
            chunk = conn.recv(self.max_request_bytes)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            chunk = b""
        request.head += chunk
        complete = b"\r\n\r\n" in request.head or b"\n\n" in request.head
        if not chunk or (not complete and len(request.head) > self.max_request_bytes):
            self._drop(selector, pending, conn)  # gone, or a request no endpoint here takes
            return
        if not complete:
            return
        selector.unregister(conn)
        del pending[conn]
        try:
            self._jobs.put_nowait((conn, request.address, bytes(request.head)))
        except queue.Full:
            with contextlib.suppress(OSError):
                conn.send(_BUSY)  # a few bytes into an empty socket buffer: does not block
            _close(conn)

    @staticmethod
    def _drop(
        selector: selectors.BaseSelector,
        pending: dict[socket.socket, _Pending],
        conn: socket.socket,
    ) -> None:
        selector.unregister(conn)
        del pending[conn]
        conn.close()

    # ------------------------------------------------------------------ the handler threads
    def _handle_requests(self) -> None:
        while (job := self._jobs.get()) is not None:
            conn, address, head = job
            try:
                self._handler(cast(Any, (conn, head)), address, cast(Any, self))
            except OSError as exc:  # timed out writing, or the client went away
                log.debug("metrics: %s: %s", address, exc)
            except Exception:
                log.exception("metrics: answering %s failed", address)
            finally:
                _close(conn)


_POLL_S = 0.25  # how soon the reader thread notices stop()
_BUSY = (
    b"HTTP/1.0 503 Service Unavailable\r\nContent-Type: text/plain\r\n"
    b"Content-Length: 5\r\nConnection: close\r\n\r\nbusy\n"
)


@dataclasses.dataclass
class _Pending:
    """A connection whose request has not fully arrived."""

    address: Any
    deadline: float
    head: bytearray = dataclasses.field(default_factory=bytearray)


class _SocketWriter(io.BufferedIOBase):
    """Unbuffered writes with `sendall` (as socketserver's own), so that an answer cut short by
    the timeout leaves nothing buffered to flush later."""

    def __init__(self, conn: socket.socket) -> None:
        self._conn = conn

    def writable(self) -> bool:
        return True

    def write(self, b: Any) -> int:
        self._conn.sendall(b)
        return len(b)


def _close(conn: socket.socket) -> None:
    """Close after the answer is sent: shut down writing first so the client reads to the end."""
    with contextlib.suppress(OSError):
        conn.shutdown(socket.SHUT_WR)
    conn.close()
