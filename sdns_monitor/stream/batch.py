"""Micro-batches on their way through `run`, and decoding their messages into frames.

No Kafka here: a message is anything with kafka-python's `ConsumerRecord` fields (topic,
partition, offset, timestamp, key, value, headers), and a record future anything with its
`FutureRecordMetadata` interface (`is_done`, `failed()`, `exception`), so fakes serve in tests.
"""

from __future__ import annotations

import concurrent.futures
import threading
import time
from collections import Counter as Tally
from dataclasses import dataclass, field
from typing import Any, TypeVar

import numpy as np

from sdns_monitor.detector import Detector
from sdns_monitor.errors import FrameError, UnreadableRecord
from sdns_monitor.frames import decode_bytes
from sdns_monitor.records import Alert, CameraAlert, Source, encode_key, output_key
from sdns_monitor.settings import RunSettings
from sdns_monitor.stream.intake import UnreadableMessage
from sdns_monitor.stream.routing import Models

E = TypeVar("E", bound=BaseException)


@dataclass(frozen=True)
class DecodeLimits:
    """What one message may cost to decode (RunSettings' limits)."""

    max_frame_bytes: int = 16 * 1024 * 1024
    max_pixels: int = 3840 * 2160
    max_frames: int = 256
    reduced_jpeg: bool = True  # decode JPEG at the smallest DCT scale the model input allows

    @classmethod
    def of(cls, s: RunSettings) -> DecodeLimits:
        return cls(
            s.max_frame_bytes, s.max_pixels, s.max_frames_per_message, not s.full_jpeg_decode
        )


@dataclass
class Frame:
    source: Source
    key: bytes | None  # the Kafka key of its outputs: records.output_key of the message key
    image: np.ndarray  # uint8 1 x S x S x C, prepared for the encoder
    detector: Detector  # the model of its key (routing)


@dataclass
class Undecodable:
    message: Any
    error: Exception
    source: Source


@dataclass
class Decoded:
    frames: list[Frame] = field(default_factory=list)
    undecodable: list[Undecodable] = field(default_factory=list)


@dataclass
class Batch:
    """One micro-batch and what it did. Stats, metrics and callbacks see it only once every
    record it caused was acknowledged (`delivered()`), so a retried batch counts once."""

    messages: list[Any]
    models: Models | None  # the models that prepare and score it, fixed when it was consumed
    generation: int  # batches of an older generation were abandoned after a failure
    started: float = field(default_factory=time.monotonic)
    decoded: concurrent.futures.Future[Decoded] | None = None
    scored: threading.Event = field(default_factory=threading.Event)
    error: BaseException | None = None  # raised while scoring (OutputError or a bug)
    snapshot: Any = None  # the scorer's incident state before this batch
    futures: list[Any] = field(default_factory=list)  # one per record sent
    # index in `futures` -> (topic, what stands in for it if refused for good: outputs.py)
    fallbacks: dict[int, tuple[str, Any]] = field(default_factory=dict)
    refused: Tally[str] = field(default_factory=Tally)  # records refused for good, per topic
    messages_by_topic: Tally[str] = field(default_factory=Tally)
    frames: Tally[str] = field(default_factory=Tally)
    flagged: Tally[str] = field(default_factory=Tally)
    alerts: list[Alert | CameraAlert] = field(default_factory=list)
    dead_letters: Tally[str] = field(default_factory=Tally)  # per error class
    incidents_closed: int = 0  # frame incidents closed, camera alarms cleared
    silences: int = 0  # camera-silent records
    moves: list[tuple[str, set[Any]]] | None = None  # a rebalance to follow, not frames
    # Whether the scorer writes the changed cameras' state with this batch (state.py); the
    # offsets of a batch that does not wait in InFlight for a later one that does.
    writes_state: bool = True
    closed_ids: list[str] = field(default_factory=list)

    @property
    def nbytes(self) -> int:
        """The message bytes (values) of the batch."""
        return sum(len(m.value) for m in self.messages if m.value is not None)

    @property
    def nframes(self) -> int:
        """Its frames, once decoded (0 before)."""
        if self.decoded is None or not self.decoded.done() or self.decoded.exception():
            return 0
        return len(self.decoded.result().frames)

    @classmethod
    def decoded_already(
        cls, messages: list[Any], models: Models | None, generation: int, decoded: Decoded
    ) -> Batch:
        """A batch decoded on the calling thread (no decoder pool)."""
        batch = cls(messages, models, generation)
        batch.decoded = concurrent.futures.Future()
        batch.decoded.set_result(decoded)
        return batch

    def delivered(self) -> bool | None:
        """True when every record was acknowledged, False when one failed, None if pending."""
        if not self.scored.is_set():
            return None
        if self.error is not None or any(f.failed() for f in self.futures):
            return False
        return True if all(f.is_done for f in self.futures) else None

    def failure(self) -> str:
        if self.error is not None:
            return str(self.error)
        failed = [f for f in self.futures if f.failed()]
        return (
            f"{len(failed)} of {len(self.futures)} records were not delivered "
            f"({failed[0].exception})"
        )

    def message_at(self, source: Source) -> Any:
        """The message a frame came from."""
        where = (source.topic, source.partition, source.offset)
        return next(m for m in self.messages if (m.topic, m.partition, m.offset) == where)


def decode_messages(messages: list[Any], models: Models, limits: DecodeLimits) -> Decoded:
    """On a decoder thread: frames prepared for the model of their key, and the messages that
    cannot be decoded (they become dead letters)."""
    out = Decoded()
    for m in messages:
        key, key_encoding = encode_key(m.key)
        base = dict(
            topic=m.topic,
            partition=m.partition,
            offset=m.offset,
            key=key,
            key_encoding=key_encoding,
            timestamp_ms=m.timestamp,
        )
        detector = models.for_key(m.key)
        try:
            if isinstance(m, UnreadableMessage):
                raise UnreadableRecord(m.error)
            min_size = detector.manifest.input.size if limits.reduced_jpeg else None
            images = detector.prepare(decode_value(m, limits, min_size))
        except Exception as exc:  # whatever one message does, it is that message's dead letter
            out.undecodable.append(Undecodable(m, _without_frames(exc), Source(**base)))
            continue
        for i in range(images.shape[0]):
            source = Source(**base, frame_index=i)
            out.frames.append(Frame(source, output_key(m.key), images[i : i + 1], detector))
    return out


def _without_frames(exc: E) -> E:
    """`exc` and the exceptions chained to it, without their tracebacks: a traceback holds the
    frames it passed through, and so `decode_messages`' own, whose `out` holds `exc`: a
    reference cycle that kept every batch with a bad message (its messages, images and
    frames) alive until a full garbage collection, minutes later."""
    seen: set[int] = set()
    todo: list[BaseException | None] = [exc]
    while todo:
        e = todo.pop()
        if e is None or id(e) in seen:
            continue
        seen.add(id(e))
        e.__traceback__ = None
        todo += [e.__cause__, e.__context__]
    return exc


def decode_value(message: Any, limits: DecodeLimits, min_size: int | None = None) -> np.ndarray:
    """A message value as an image array (or a batch of them); FrameError says why not."""
    value = message.value
    if value is None or len(value) == 0:
        raise FrameError("empty message value: send encoded image bytes or an .npy array")
    if len(value) > limits.max_frame_bytes:
        raise FrameError(
            f"message of {len(value)} bytes exceeds --max-frame-bytes {limits.max_frame_bytes}"
        )
    content_type = next((v for k, v in message.headers or [] if k == "content-type"), None)
    return decode_bytes(
        value,
        content_type.decode("latin-1") if content_type else None,
        max_pixels=limits.max_pixels,
        max_frames=limits.max_frames,
        min_size=min_size,
    )
