"""`StreamMonitor`: the consume -> decode -> score -> produce -> commit loop of `run`.

At-least-once: the offsets of a polled batch are committed only after every alert, score and
dead-letter record it caused has been acknowledged by the broker. A frame that cannot be
decoded goes to the dead-letter topic with the reason; it never stops the stream.

This is the first, sequential version of the loop (issue 3 continues it: incidents, metrics,
hot reload, rebalance hooks, a pipelined decoder).
"""

from __future__ import annotations

import base64
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from sdns_monitor.detector import Detector
from sdns_monitor.errors import FrameError, SdnsError
from sdns_monitor.frames import decode_bytes
from sdns_monitor.incidents import IncidentTracker
from sdns_monitor.records import (
    Alert,
    ModelRef,
    ScoreRecord,
    Source,
    dead_letter_headers,
    encode_key,
)
from sdns_monitor.settings import RunSettings

log = logging.getLogger("sdns_monitor.stream")


class OutputError(SdnsError):
    """Alerts, scores or dead letters could not be delivered; nothing was committed."""


@dataclass
class StreamStats:
    messages: int = 0
    frames: int = 0
    alerts: int = 0  # alerts sent (flagged frames inside an incident's cooldown send none)
    flagged: int = 0
    incidents_closed: int = 0
    dead_letters: int = 0
    batches: int = 0
    started: float = field(default_factory=time.monotonic)

    def frames_per_second(self) -> float:
        return self.frames / max(time.monotonic() - self.started, 1e-9)


@dataclass
class _Frame:
    source: Source
    key: bytes | None  # the message key as it came: outputs are keyed by it
    image: np.ndarray  # uint8 1 x S x S x C, prepared for the encoder


class StreamMonitor:
    """Watch the configured topics and publish alerts for out-of-distribution frames.

    >>> monitor = StreamMonitor(settings, on_alert=print)
    >>> monitor.run(stop_event)      # returns when stop_event is set
    """

    def __init__(
        self,
        settings: RunSettings,
        detector: Detector | None = None,
        on_alert: Callable[[Alert], None] | None = None,
    ) -> None:
        self.settings = settings
        self.detector = detector or Detector.load(settings.model)
        self.on_alert = on_alert
        self.stats = StreamStats()
        self.model_ref = ModelRef(hash=self.detector.hash, name=self.detector.name)
        self.incidents = IncidentTracker(settings.incident_window_s, settings.incident_cooldown_s)

    # ------------------------------------------------------------------ clients
    def _consumer(self) -> Any:
        from kafka import KafkaConsumer

        s = self.settings
        consumer = KafkaConsumer(
            bootstrap_servers=s.bootstrap_servers,
            group_id=s.group_id,
            enable_auto_commit=False,
            auto_offset_reset="earliest" if s.from_beginning else "latest",
            session_timeout_ms=s.session_timeout_ms,
            heartbeat_interval_ms=s.heartbeat_interval_ms,
            max_partition_fetch_bytes=max(s.max_frame_bytes + 1024, 1 << 20),
            fetch_max_bytes=max(s.max_frame_bytes * 2, 50 << 20),
            **s.security.client_options(),
        )
        if s.topic_pattern:
            consumer.subscribe(pattern=s.topic_pattern)
        else:
            consumer.subscribe(topics=s.topic)
        return consumer

    def _producer(self) -> Any:
        from kafka import KafkaProducer

        return KafkaProducer(
            bootstrap_servers=self.settings.bootstrap_servers,
            acks="all",
            retries=5,
            max_request_size=max(self.settings.max_frame_bytes + 64 * 1024, 1 << 20),
            **self.settings.security.client_options(),
        )

    # ------------------------------------------------------------------ loop
    def run(self, stop: threading.Event, idle_exit_s: float | None = None) -> StreamStats:
        """Consume until `stop` is set (or nothing arrived for `idle_exit_s` seconds)."""
        consumer, producer = self._consumer(), self._producer()
        last_data = time.monotonic()
        try:
            while not stop.is_set():
                polled = consumer.poll(
                    timeout_ms=max(self.settings.max_wait_ms, 10),
                    max_records=self.settings.batch_size,
                )
                messages = [m for batch in polled.values() for m in batch]
                if not messages:
                    if self.incidents.open_count:
                        self._close_incidents(producer)  # a quiet stream still closes them
                    if idle_exit_s is not None and time.monotonic() - last_data > idle_exit_s:
                        break
                    continue
                last_data = time.monotonic()
                self.process(messages, producer)
                consumer.commit()  # only after process() saw every record acknowledged
        finally:
            producer.close(timeout=10)
            consumer.close()  # leaves the group, so partitions move on at once
        return self.stats

    def process(self, messages: list[Any], producer: Any) -> None:
        """Score one polled batch and deliver every record it causes (acknowledged)."""
        frames: list[_Frame] = []
        futures = []
        for m in messages:
            self.stats.messages += 1
            key, key_encoding = encode_key(m.key)
            base = dict(topic=m.topic, partition=m.partition, offset=m.offset, key=key,
                        key_encoding=key_encoding, timestamp_ms=m.timestamp)  # fmt: skip
            try:
                for i, image in enumerate(self._decode(m)):
                    frames.append(_Frame(Source(**base, frame_index=i), m.key, image))
            except FrameError as exc:
                futures.append(self._dead_letter(producer, m, exc, Source(**base)))
        if frames:
            futures.extend(self._score(frames, producer))
        futures.extend(self._close_incidents(producer, flush=False))
        producer.flush()
        failed = [f for f in futures if f.failed()]
        if failed:
            raise OutputError(
                f"{len(failed)} of {len(futures)} records were not delivered "
                f"({failed[0].exception}); offsets not committed"
            )
        self.stats.batches += 1

    def _decode(self, message: Any) -> list[np.ndarray]:
        value = message.value
        if value is None or len(value) == 0:
            raise FrameError("empty message value: send encoded image bytes or an .npy array")
        if len(value) > self.settings.max_frame_bytes:
            raise FrameError(
                f"message of {len(value)} bytes exceeds --max-frame-bytes "
                f"{self.settings.max_frame_bytes}"
            )
        headers = dict(message.headers or [])
        content_type = headers.get("content-type")
        frames = decode_bytes(value, content_type.decode("latin-1") if content_type else None)
        return [self.detector.prepare(frames[i : i + 1]) for i in range(frames.shape[0])]

    def _dead_letter(self, producer: Any, message: Any, exc: BaseException, source: Source) -> Any:
        self.stats.dead_letters += 1
        log.warning("dead letter %s[%d]@%d: %s", source.topic, source.partition, source.offset, exc)
        value = message.value
        if value is not None and len(value) > self.settings.max_frame_bytes:
            value = None  # too large for the producer: the headers still say where it was
        return producer.send(
            self.settings.dlq_topic,
            key=message.key,
            value=value,
            headers=dead_letter_headers(list(message.headers or []), exc, source),
        )

    def _score(self, frames: list[_Frame], producer: Any) -> list[Any]:
        det, s = self.detector, self.settings
        scores = det.anomaly_scores(np.concatenate([f.image for f in frames]))
        result = det.result(scores, alarm_rate=s.alarm_rate, threshold=s.threshold)
        now_ms = int(time.time() * 1000)
        futures = []
        for i, frame in enumerate(frames):
            self.stats.frames += 1
            key = frame.key
            if s.scores_topic:
                record = ScoreRecord(
                    source=frame.source,
                    score=float(result.scores[i]),
                    p_value=float(result.p_values[i]),
                    flagged=bool(result.flags[i]),
                    model=self.model_ref,
                )
                futures.append(
                    producer.send(s.scores_topic, key=key, value=record.model_dump_json().encode())
                )
            if result.flags[i]:
                self.stats.flagged += 1
                incident, send = self.incidents.flagged(
                    frame.source.key, frame.source.key_encoding, now_ms
                )
                if not send:
                    continue
                alert = Alert(
                    source=frame.source,
                    score=float(result.scores[i]),
                    p_value=float(result.p_values[i]),
                    alarm_rate=result.alarm_rate,
                    threshold=result.threshold,
                    model=self.model_ref,
                    detected_at_ms=now_ms,
                    incident=incident,
                )
                self.stats.alerts += 1
                futures.append(
                    producer.send(s.alert_topic, key=key, value=alert.model_dump_json().encode())
                )
                if self.on_alert is not None:
                    self.on_alert(alert)
        return futures

    def _close_incidents(self, producer: Any, flush: bool = True) -> list[Any]:
        """Send a closing record for every incident whose key has been quiet for a window."""
        futures = []
        for closed in self.incidents.expire(int(time.time() * 1000)):
            self.stats.incidents_closed += 1
            log.info(
                "incident %s closed after %d flagged frames", closed.incident_id, closed.frames
            )
            key = None if closed.key is None else _raw_key(closed.key, closed.key_encoding)
            futures.append(
                producer.send(
                    self.settings.alert_topic, key=key, value=closed.model_dump_json().encode()
                )
            )
        if flush and futures:
            producer.flush()
            failed = [f for f in futures if f.failed()]
            if failed:
                raise OutputError(f"incident closing records not delivered ({failed[0].exception})")
        return futures


def _raw_key(key: str, encoding: str | None) -> bytes:
    return base64.b64decode(key) if encoding == "base64" else key.encode("utf-8")
