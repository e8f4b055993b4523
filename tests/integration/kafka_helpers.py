"""Helpers of the tests that talk to the real broker: topics, frames, reading records back."""

from __future__ import annotations

import contextlib
import io
import json
import os
import re
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
from kafka import KafkaAdminClient, KafkaConsumer, KafkaProducer
from kafka.admin import NewTopic
from kafka.errors import TopicAlreadyExistsError
from PIL import Image

from sdns_monitor.broker import Broker, free_port
from sdns_monitor.settings import RunSettings, load_settings

# Tansu needs short group timeouts; metrics on a free port so tests never collide.
TANSU = {"session_timeout_ms": 6000, "heartbeat_interval_ms": 1000, "metrics_port": 0}
TANSU_ENV = {
    "SDNS_SESSION_TIMEOUT_MS": "6000",
    "SDNS_HEARTBEAT_INTERVAL_MS": "1000",
    "SDNS_METRICS_PORT": "0",
    "OMP_NUM_THREADS": "1",
}


def png(image: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(image.squeeze(-1)).save(buf, format="PNG")
    return buf.getvalue()


def noise(n: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (n, 16, 16, 1), dtype=np.uint8)


def topics(broker: Broker, *names: str, partitions: int = 1) -> dict[str, str]:
    """New topics with unique names: {"frames": "frames-1a2b3c4d", ...} plus "run_id"."""
    run_id = uuid.uuid4().hex[:8]
    out = {name: f"{name}-{run_id}" for name in names}
    admin = KafkaAdminClient(bootstrap_servers=broker.bootstrap_servers)
    # The client may retry its own request on a busy machine; the names are new (a fresh run
    # id), so one that "already exists" was made by the first attempt.
    with contextlib.suppress(TopicAlreadyExistsError):
        admin.create_topics([NewTopic(t, partitions, 1) for t in out.values()])
    admin.close()
    return {**out, "run_id": run_id}


def produce(
    broker: Broker, topic: str, values: list[bytes], key: bytes | None = b"cam", **options: Any
) -> None:
    producer = KafkaProducer(bootstrap_servers=broker.bootstrap_servers, **options)
    for value in values:
        producer.send(topic, key=key, value=value)
    producer.flush()
    producer.close()


def read_all(broker: Broker, topic: str, expect: int, timeout_ms: int = 8000) -> list[Any]:
    """Records of `topic` from the start: stops at `expect` or after `timeout_ms` of silence."""
    consumer = KafkaConsumer(
        topic,
        bootstrap_servers=broker.bootstrap_servers,
        auto_offset_reset="earliest",
        consumer_timeout_ms=timeout_ms,
        group_id=None,
    )
    out = []
    for m in consumer:
        out.append(m)
        if len(out) >= expect:
            break
    consumer.close()
    return out


def read_json(broker: Broker, topic: str, expect: int, timeout_ms: int = 8000) -> list[Any]:
    return [json.loads(m.value) for m in read_all(broker, topic, expect, timeout_ms)]


def run_settings(broker: Broker, bundle: Path, names: dict[str, str], **extra: Any) -> RunSettings:
    """Settings of a monitor reading names["frames"] from the beginning, in its own group,
    with frame incidents (`alerts = frames`: one flagged frame, one alert) unless `alerts` is
    given: most tests here are about delivery, and camera alarms need many frames."""
    given = {
        "alerts": "frames",
        "topic": [names["frames"]],
        "model": str(bundle),
        "group_id": f"g-{names['run_id']}",
        "bootstrap_servers": broker.bootstrap_servers,
        "from_beginning": True,
        "alarm_rate": 0.1,
        **TANSU,
    }
    for role in ("alerts", "dlq", "scores"):
        if role in names:
            given[{"alerts": "alert_topic", "dlq": "dlq_topic", "scores": "scores_topic"}[role]] = (
                names[role]
            )
    return load_settings({**given, **extra}, {})


def run_command(
    broker: Broker,
    bundle: Path,
    names: dict[str, str],
    *extra: str,
    topic: str | None = None,
    frame_incidents: bool = True,
) -> tuple[list[str], dict[str, str]]:
    """The command line and environment of `sdns-monitor run` as a subprocess: like
    `run_settings`, reading `topic` (names["frames"]) from the beginning in its own group,
    writing to whichever of the alerts, dlq and scores topics `names` has; with frame
    incidents at alarm rate 0.1 unless `frame_incidents` is False."""
    command = [sys.executable, "-m", "sdns_monitor.cli", "run"]
    command += ["--topic", topic or names["frames"], "--model", str(bundle), "--from-beginning"]
    command += ["--group-id", f"g-{names['run_id']}"]
    for role, option in (
        ("alerts", "--alert-topic"),
        ("dlq", "--dlq-topic"),
        ("scores", "--scores-topic"),
    ):
        if role in names:
            command += [option, names[role]]
    if frame_incidents:
        command += ["--alerts", "frames", "--alarm-rate", "0.1"]
    env = {**os.environ, **TANSU_ENV, "SDNS_BOOTSTRAP_SERVERS": broker.bootstrap_servers}
    return [*command, *extra], env


def wait_for(condition: Any, timeout: float, what: str, every: float = 0.1) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return
        time.sleep(every)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")


def http_get(url: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(url, timeout=5) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()


def metric(text: str, sample: str, **labels: str) -> float:
    """The value of one sample in a Prometheus exposition (labels sorted, as prometheus_client writes them)."""
    want = ",".join(f'{k}="{v}"' for k, v in sorted(labels.items()))
    pattern = re.escape(sample) + (r"\{" + re.escape(want) + r"\}" if labels else "") + r" (\S+)"
    found = re.search("^" + pattern + "$", text, re.MULTILINE)
    if found is None:
        raise AssertionError(f"no sample {sample}{{{want}}} in the exposition")
    return float(found.group(1))


class LineReader:
    """Collects a subprocess's stderr lines on a thread, for waiting on log lines."""

    def __init__(self, proc: subprocess.Popen[str]) -> None:
        import threading

        self.lines: list[str] = []
        self._thread = threading.Thread(target=self._read, args=(proc,), daemon=True)
        self._thread.start()

    def _read(self, proc: subprocess.Popen[str]) -> None:
        assert proc.stderr is not None
        for line in proc.stderr:
            self.lines.append(line.rstrip("\n"))

    def find(self, pattern: str) -> list[re.Match[str]]:
        return [m for line in list(self.lines) if (m := re.search(pattern, line))]

    def text(self) -> str:
        return "\n".join(self.lines)


@contextlib.contextmanager
def local_s3(log: Path, bucket: str = "tansu") -> Iterator[dict[str, str]]:
    """A local S3 server (moto's server mode) with one bucket; yields the environment that
    points Tansu's `s3://BUCKET/` storage at it. Its data lives as long as the server."""
    port = free_port()
    with log.open("ab") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    endpoint = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            try:  # moto accepts unsigned requests: no S3 client library needed
                urllib.request.urlopen(urllib.request.Request(f"{endpoint}/{bucket}", method="PUT"))
                break
            except OSError:
                if time.monotonic() > deadline or proc.poll() is not None:
                    raise AssertionError(f"the S3 server did not start; see {log}") from None
                time.sleep(0.2)
        yield {
            "AWS_ENDPOINT": endpoint,
            "AWS_ALLOW_HTTP": "true",
            "AWS_DEFAULT_REGION": "us-east-1",
            "AWS_ACCESS_KEY_ID": "test",
            "AWS_SECRET_ACCESS_KEY": "test",
        }
    finally:
        proc.terminate()
        proc.wait(10)


def produce_doctored(
    broker: Broker,
    topic: str,
    value: bytes,
    headers: list[tuple[str, bytes]],
    replace: dict[bytes, bytes],
    key: bytes | None = b"cam",
) -> None:
    """Produce one record whose encoded bytes are then edited (each `replace` pair of the same
    length), with the batch CRC computed afterwards, so the broker stores and serves a record
    kafka-python itself cannot write: a null header value (varint -1 where 0 was), a header
    key that is not UTF-8. What a librdkafka or Java producer may send, on the real protocol."""
    from kafka.record.default_records import DefaultRecordBatchBuilder

    original = DefaultRecordBatchBuilder.build

    def build(self: Any) -> Any:
        compressed = self._maybe_compress()
        for old, new in replace.items():
            assert len(old) == len(new) and self._buffer.count(old) == 1, old
            at = self._buffer.find(old)
            self._buffer[at : at + len(old)] = new
        self.write_header(compressed)  # the CRC over the edited bytes
        return self._buffer

    producer = KafkaProducer(bootstrap_servers=broker.bootstrap_servers, linger_ms=0)
    DefaultRecordBatchBuilder.build = build  # type: ignore[method-assign]
    try:
        producer.send(topic, key=key, value=value, headers=headers).get(timeout=10)
    finally:
        DefaultRecordBatchBuilder.build = original  # type: ignore[method-assign]
        producer.close()
