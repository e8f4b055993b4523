"""The records a batch sends, and what happens when one is not taken.

Two kinds of failure, told apart as Kafka Streams' production exception handler does:

- transient (a broker away, a leader moving, a timeout): the batch is not delivered, nothing is
  committed, and the loop retries it from its first offset (offsets.py);
- permanent: the broker, or the client's own size check, will never take this record (too
  large for the topic's `max.message.bytes` or the producer's request limit, invalid).
  Retrying would fail the batch forever, so the record is replaced: a dead letter by a
  reference (no value, an empty key, the `sdns-*` headers saying where the original is); a
  score or alert record (small, since keys are bounded: records.MAX_KEY_BYTES; refused, say, by
  a schema the topic enforces) by a dead-letter reference to its frame with
  `sdns-error-class: OutputRefused`. Both are logged and counted
  (`sdns_refused_records_total{topic}`), and the stream goes on.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable
from typing import Any

from kafka.errors import InvalidRecordError, MessageSizeTooLargeError, RecordListTooLargeError

from sdns_monitor.errors import OutputRefused
from sdns_monitor.records import Source, dead_letter_headers
from sdns_monitor.stream.batch import Batch
from sdns_monitor.stream.logs import Throttle

log = logging.getLogger("sdns_monitor.stream")

# Errors that say: this record will never be taken, whatever is retried.
REFUSED: tuple[type[Exception], ...] = (
    MessageSizeTooLargeError,
    RecordListTooLargeError,
    InvalidRecordError,
)

# What stands in for a refused record: (producer, the refusal) -> the future of its stand-in.
Instead = Callable[[Any, BaseException], Any]


class Delivered:
    """The future of a record that needs no sending (dropped after a refusal)."""

    is_done = True
    exception = None

    def failed(self) -> bool:
        return False

    def get(self, timeout: float | None = None) -> None:
        return None


class Outputs:
    """Sends a batch's records; owned by the scorer thread, `recover` called by the loop."""

    def __init__(self, dlq_topic: str, max_frame_bytes: int) -> None:
        self.dlq_topic = dlq_topic
        self.max_frame_bytes = max_frame_bytes
        self._log_throttle = Throttle(10.0)

    def send(
        self,
        batch: Batch,
        producer: Any,
        topic: str,
        *,
        key: bytes | None,
        value: bytes | None,
        headers: list[tuple[str, bytes]] | None = None,
        about: Source | None = None,
        instead: Instead | None = None,
        partition: int | None = None,
    ) -> None:
        """Send one record of `batch`; `instead` stands in for it if it is refused for good
        (by default, for a record `about` a frame, a dead-letter reference to that frame)."""
        if instead is None and about is not None:
            instead = self._refused_output(topic, about)
        try:
            if partition is None:
                future = producer.send(topic, key=key, value=value, headers=headers)
            else:
                future = producer.send(
                    topic, key=key, value=value, headers=headers, partition=partition
                )
        except REFUSED as exc:  # the client's own size check, before anything is sent
            future, instead = self._refused(batch, producer, topic, exc, instead), None
        batch.futures.append(future)
        batch.fallbacks[len(batch.futures) - 1] = (topic, instead)

    def _refused_output(self, topic: str, about: Source) -> Instead:
        def reference(producer: Any, refusal: BaseException) -> Any:
            error = OutputRefused(f"the record for {topic} was refused for good: {refusal}")
            headers = dead_letter_headers([], error, about)
            return producer.send(self.dlq_topic, key=b"", value=None, headers=headers)

        return reference

    def recover(self, batch: Batch, producer: Any) -> bool:
        """Replace the records of `batch` that were refused for good by their stand-ins. False
        when a failure is one a retry may fix (or `batch` failed otherwise)."""
        if batch.error is not None:
            return False
        failed = [i for i, f in enumerate(batch.futures) if f.failed()]
        if not failed or not all(isinstance(batch.futures[i].exception, REFUSED) for i in failed):
            return False
        for i in failed:
            topic, instead = batch.fallbacks.pop(i, ("?", None))
            refusal = batch.futures[i].exception
            batch.futures[i] = self._refused(batch, producer, topic, refusal, instead)
        return True

    def _refused(
        self,
        batch: Batch,
        producer: Any,
        topic: str,
        refusal: BaseException,
        instead: Instead | None,
    ) -> Any:
        batch.refused[topic] += 1
        what = "a reference is sent instead" if instead is not None else "it is dropped"
        log.error("a record for %s was refused for good (%s); %s", topic, refusal, what)
        if instead is None:
            return Delivered()
        try:
            return instead(producer, refusal)
        except REFUSED as again:
            log.error("its stand-in was refused too (%s); dropped", again)
            return Delivered()

    def dead_letter(
        self, batch: Batch, producer: Any, message: Any, exc: BaseException, source: Source
    ) -> None:
        """Send `message` to the dead-letter topic as it came, with the sdns-* headers. What the
        producer refuses to send as it is (a tombstone without key, header values it cannot
        write) and what the broker refuses (too large) goes as a reference instead."""
        self._log_dead_letter(exc, source)
        value = message.value
        if value is not None and len(value) > self.max_frame_bytes:
            value = None  # too large for the producer: the headers still say where it was
        key = message.key
        if key is None and value is None:
            key = b""  # a record needs a key or a value; the headers say where it was

        def reference(producer: Any, why: BaseException) -> Any:
            headers = dead_letter_headers([], exc, source)
            return producer.send(self.dlq_topic, key=b"", value=None, headers=headers)

        try:
            headers = dead_letter_headers(list(message.headers or []), exc, source)
        except (TypeError, ValueError, AttributeError) as odd:  # headers no producer can write
            batch.futures.append(reference(producer, odd))
            return
        try:
            self.send(
                batch,
                producer,
                self.dlq_topic,
                key=key,
                value=value,
                headers=headers,
                instead=reference,
            )
        except (TypeError, ValueError, AttributeError) as odd:  # the producer's own checks
            log.warning("dead letter %s sent as a reference: %s", _where(source), odd)
            batch.futures.append(reference(producer, odd))

    def _log_dead_letter(self, exc: BaseException, source: Source) -> None:
        # One kind per class and reason: the reason's words up to its first detail (a colon,
        # parenthesis, comma or quote), numbers left out, so that payload bytes and shapes do
        # not make a new kind of every junk frame.
        reason = re.sub(r"[0-9]+", "#", re.split(r"[:(,'\"]", str(exc), maxsplit=1)[0])[:60]
        kind = f"{type(exc).__name__}:{reason}"
        if self._log_throttle.ready(kind):
            suppressed = self._log_throttle.take_suppressed(kind)
            more = f" (and {suppressed} more like it)" if suppressed else ""
            log.warning("dead letter %s: %s%s", _where(source), exc, more)


def _where(source: Source) -> str:
    return f"{source.topic}[{source.partition}]@{source.offset}"
