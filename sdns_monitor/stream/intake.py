"""What the loop takes from the consumer: micro-batches by size or wait, and backpressure (the
consumer pauses instead of buffering while the pipeline is full)."""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass, field
from typing import Any

from kafka.errors import CorruptRecordError

log = logging.getLogger("sdns_monitor.stream")

IDLE_POLL_MS = 500  # how long an empty poll waits before the loop looks around again
BUSY_POLL_MS = 5  # with batches in flight: come back soon to commit them


@dataclass
class UnreadableMessage:
    """Stands in, in a batch, for a record the client could not parse: it becomes a dead-letter
    reference (no value, headers naming where it is), and its offset is committed after it."""

    topic: str
    partition: int
    offset: int
    error: str
    key: bytes | None = None
    value: bytes | None = None
    headers: list[tuple[str, bytes]] = field(default_factory=list)
    timestamp: int | None = None


class Intake:
    """Polls the consumer (owned by the loop thread) for micro-batches."""

    def __init__(self, consumer: Any, batch_size: int, max_wait_ms: int) -> None:
        self.consumer = consumer
        self.batch_size = batch_size
        self.max_wait_ms = max_wait_ms
        self.paused = False
        self.last_records = time.monotonic()  # when a poll last returned records

    def starved_s(self, behind: int) -> float:
        """How long the consumer has fetched nothing while `behind` messages are waiting for
        it and it is not paused on purpose (0 when it is not starved): a broker that stopped
        serving fetches, which neither the connection nor the loop shows."""
        if behind <= 0 or self.paused:
            self.last_records = time.monotonic()
            return 0.0
        return time.monotonic() - self.last_records

    def collect(self, stop: threading.Event, busy: bool) -> list[Any]:
        """A micro-batch: up to `batch_size` messages, waiting at most `max_wait_ms` after the
        first one arrived. [] when nothing arrived within IDLE_POLL_MS (BUSY_POLL_MS when
        `busy`)."""
        self.resume()
        out: list[Any] = []
        deadline: float | None = None
        while len(out) < self.batch_size and not stop.is_set():
            if deadline is None:
                timeout_ms = BUSY_POLL_MS if busy else IDLE_POLL_MS
            else:
                timeout_ms = int((deadline - time.monotonic()) * 1000)
                if timeout_ms <= 0:
                    break
            got = self._poll(timeout_ms, self.batch_size - len(out))
            if got and deadline is None:
                deadline = time.monotonic() + self.max_wait_ms / 1000
            elif not got and deadline is None:
                break
            out.extend(got)
        return out

    def hold(self) -> list[Any]:
        """Pause every assigned partition (again: a rebalance may add partitions) and poll
        without waiting, which keeps the group membership alive. Returns whatever the consumer
        still hands out: it is scored, never dropped."""
        self.consumer.pause(*self.consumer.assignment())
        self.paused = True
        return self._poll(0, None)

    def resume(self) -> None:
        if self.paused:
            self.consumer.resume(*self.consumer.paused())
            self.paused = False

    def _poll(self, timeout_ms: int, max_records: int | None) -> list[Any]:
        try:
            polled = self.consumer.poll(timeout_ms=timeout_ms, max_records=max_records)
        except CorruptRecordError as exc:  # raised again at every poll until it is skipped
            return self._skip_unreadable(exc)
        out = [m for batch in polled.values() for m in batch]
        if out:
            self.last_records = time.monotonic()
        return out

    def _skip_unreadable(self, exc: CorruptRecordError) -> list[Any]:
        """Seek past the record the client cannot parse (a header key that is not UTF-8, a
        corrupt batch). The client raises before it returns that partition's next record and
        leaves the partition's position on it; which partition it was, only its fetcher
        knows (kafka-python 3.0: the partition records being drained)."""
        fetcher = getattr(self.consumer, "_fetcher", None)
        part = getattr(fetcher, "_next_partition_records", None)
        tp = getattr(part, "topic_partition", None)
        if tp is None or tp not in self.consumer.assignment():
            raise exc  # cannot tell where it is: let the loop fail rather than spin
        offset = self.consumer.position(tp)
        self.consumer.seek(tp, offset + 1)
        if fetcher is not None:
            fetcher._next_partition_records = None  # its iterator died with the exception
        reason = " ".join(str(exc).split())[:300]
        log.error(
            "skipped %s[%d]@%d: the Kafka client cannot parse it (%s)",
            tp.topic,
            tp.partition,
            offset,
            reason,
        )
        text = f"the Kafka client cannot parse this record ({reason}); it was skipped"
        return [UnreadableMessage(tp.topic, tp.partition, offset, text)]
