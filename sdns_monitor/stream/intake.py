"""What the loop takes from the consumer: micro-batches by size or wait, and backpressure (the
consumer pauses instead of buffering while the pipeline is full)."""

from __future__ import annotations

import threading
import time
from typing import Any

IDLE_POLL_MS = 500  # how long an empty poll waits before the loop looks around again
BUSY_POLL_MS = 5  # with batches in flight: come back soon to commit them


class Intake:
    """Polls the consumer (owned by the loop thread) for micro-batches."""

    def __init__(self, consumer: Any, batch_size: int, max_wait_ms: int) -> None:
        self.consumer = consumer
        self.batch_size = batch_size
        self.max_wait_ms = max_wait_ms
        self.paused = False

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
        polled = self.consumer.poll(timeout_ms=timeout_ms, max_records=max_records)
        return [m for batch in polled.values() for m in batch]
