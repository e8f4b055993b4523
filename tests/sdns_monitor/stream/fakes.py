"""Fakes of the Kafka client objects and of a model, for unit tests of the stream's parts.

They implement only the interface the stream uses (kafka-python's ConsumerRecord,
FutureRecordMetadata, KafkaProducer.send/flush and the consumer's assignment, commit, seek,
pause and poll). Behaviour against a real broker is proven in tests/integration.
"""

from __future__ import annotations

import io
from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import Any

import numpy as np
from kafka import TopicPartition
from kafka.errors import KafkaError, MessageSizeTooLargeError
from PIL import Image

from sdns_monitor.scoring import ScoreResult
from sdns_monitor.settings import RunSettings
from sdns_monitor.stream.batch import Batch, DecodeLimits, decode_messages
from sdns_monitor.stream.routing import Models


@dataclass
class Message:
    topic: str
    partition: int
    offset: int
    value: bytes | None
    key: bytes | None = b"cam-1"
    headers: list[tuple[str, bytes | None]] = field(default_factory=list)
    timestamp: int = 1_700_000_000_000


class Future:
    """A record future: pending until `succeed()` or `fail()`."""

    def __init__(self) -> None:
        self.is_done = False
        self.exception: BaseException | None = None

    def succeed(self) -> None:
        self.is_done = True

    def fail(self, error: str = "broker said no") -> None:
        self.is_done, self.exception = True, KafkaError(error)

    def failed(self) -> bool:
        return self.exception is not None

    def get(self, timeout: float | None = None) -> None:
        if self.exception is not None:
            raise self.exception


@dataclass
class Sent:
    topic: str
    key: bytes | None
    value: bytes | None
    headers: list[tuple[str, bytes]] | None
    future: Future


class Producer:
    """Records what was sent. `acks=True` acknowledges each record at once; topics in
    `refuse` fail their records; `raise_on_send` makes send() itself raise."""

    def __init__(
        self,
        acks: bool = True,
        refuse: set[str] | None = None,
        too_large: int | None = None,
        broker_limit: int | None = None,
    ) -> None:
        self.acks = acks
        self.refuse = refuse or set()
        self.too_large = too_large  # send() raises past this many bytes (the client's check)
        self.broker_limit = broker_limit  # the future fails past this many (the topic's limit)
        self.raise_on_send: BaseException | None = None
        self.sent: list[Sent] = []
        self.flushes = 0

    def send(
        self,
        topic: str,
        key: bytes | None = None,
        value: bytes | None = None,
        headers: Any = None,
        partition: int | None = None,
    ) -> Future:
        if self.raise_on_send is not None:
            raise self.raise_on_send
        # What kafka-python's KafkaProducer.send checks before anything goes out.
        if key is None and value is None:
            raise ValueError("Need at least one: key or value")
        if not all(isinstance(k, str) and isinstance(v, bytes) for k, v in headers or []):
            raise TypeError("All headers items must be (str, bytes) tuples")
        size = len(key or b"") + len(value or b"") + sum(len(k) + len(v) for k, v in headers or [])
        if self.too_large is not None and size > self.too_large:
            raise MessageSizeTooLargeError(f"the message is {size} bytes when serialized")
        future = Future()
        if self.broker_limit is not None and size > self.broker_limit:
            future.is_done, future.exception = True, MessageSizeTooLargeError("MESSAGE_TOO_LARGE")
        elif topic in self.refuse:
            future.fail(f"{topic} refuses records")
        elif self.acks:
            future.succeed()
        self.sent.append(Sent(topic, key, value, headers, future))
        return future

    def flush(self, timeout: float | None = None) -> None:
        self.flushes += 1

    def to(self, topic: str) -> list[Sent]:
        return [s for s in self.sent if s.topic == topic]


class Consumer:
    """Assignment, commits and seeks, as the loop and the offsets use them."""

    def __init__(self, *partitions: tuple[str, int]) -> None:
        self.assigned = {TopicPartition(t, p) for t, p in partitions}
        self.commits: list[dict[TopicPartition, int]] = []
        self.async_commits: list[dict[TopicPartition, int]] = []
        self.seeks: dict[TopicPartition, int] = {}
        self.fail_commits: BaseException | None = None

    def assignment(self) -> set[TopicPartition]:
        return set(self.assigned)

    def commit(self, offsets: dict[TopicPartition, Any], timeout_ms: int | None = None) -> None:
        if self.fail_commits is not None:
            raise self.fail_commits
        self.commits.append({tp: o.offset for tp, o in offsets.items()})

    def commit_async(self, offsets: dict[TopicPartition, Any], callback: Any = None) -> None:
        self.async_commits.append({tp: o.offset for tp, o in offsets.items()})

    def seek(self, tp: TopicPartition, offset: int) -> None:
        assert isinstance(tp, TopicPartition)  # kafka-python insists
        self.seeks[tp] = offset


class Detector:
    """A model whose anomaly score is a frame's mean brightness / 255; its calibration scores
    are 0.00, 0.01, ..., 0.99, so p < 0.05 means a mean above about 242."""

    name = "fake"
    hash = "f" * 64
    manifest = SimpleNamespace(input=SimpleNamespace(size=4))  # the model's input side

    def __init__(self, fail_on: float | None = None, held_out_ratio: float | None = None) -> None:
        self.calibration = np.linspace(0.0, 0.99, 100)
        self.alarm_rate = 0.05
        self.fail_on = fail_on  # scoring a frame of this score raises (a model bug)
        self.held_out_ratio = held_out_ratio  # the bundle's held-out check (camera margin)

    def prepare(self, images: np.ndarray) -> np.ndarray:
        frames = images[None] if images.ndim == 3 else images
        return frames.astype(np.uint8)

    def anomaly_scores(self, prepared: np.ndarray) -> np.ndarray:
        scores = prepared.reshape(len(prepared), -1).mean(axis=1) / 255.0
        if self.fail_on is not None and np.any(np.isclose(scores, self.fail_on)):
            raise RuntimeError("model bug")
        return scores.astype(np.float64)

    def result(
        self, scores: np.ndarray, *, alarm_rate: float | None = None, threshold: float | None = None
    ) -> ScoreResult:
        n = len(self.calibration)
        at_least = n - np.searchsorted(self.calibration, scores, side="left")
        pv = (1.0 + at_least) / (n + 1.0)
        rate = self.alarm_rate if alarm_rate is None else alarm_rate
        return ScoreResult(scores, pv, pv < rate, rate, None)


def png(brightness: int, size: int = 4) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.full((size, size), brightness, np.uint8), mode="L").save(buf, "PNG")
    return buf.getvalue()


def settings(**overrides: Any) -> RunSettings:
    values: dict[str, Any] = dict(
        topic=["frames"], model="unused.sdns", scores_topic="scores", metrics_port=None
    )
    return RunSettings(**(values | overrides))


def models(detector: Any = None) -> Models:
    return Models(detector or Detector())


def batch(messages: list[Message], generation: int = 0, detector: Any = None) -> Batch:
    """A batch decoded on this thread."""
    m = models(detector)
    decoded = decode_messages(messages, m, DecodeLimits(max_frame_bytes=1 << 20))
    return Batch.decoded_already(messages, m, generation, decoded)
