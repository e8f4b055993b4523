"""The batches between consumer and commit, and the offsets `run` may commit.

At-least-once: a batch's offsets are committed only after every record it caused was
acknowledged, and never past an earlier batch that is still in flight (in-order settle). With
a state topic, also never past the camera state written last: a batch that did not write it
(`Batch.writes_state`, once per `state_flush_s`) is staged until a later one that did settles. When
the head batch fails, every batch in flight is abandoned and the consumer seeks back to their
first offsets, so they are consumed and scored again; nothing after them was committed.

`InFlight` is used by the loop thread, and by kafka-python's IO thread through the rebalance
listener; the offsets that both touch are under its lock.
"""

from __future__ import annotations

import collections
import contextlib
import logging
import threading
import time
from collections.abc import Callable
from typing import Any

from kafka import ConsumerRebalanceListener, OffsetAndMetadata, TopicPartition
from kafka.errors import KafkaError

from sdns_monitor.errors import OutputError
from sdns_monitor.stream.batch import Batch

log = logging.getLogger("sdns_monitor.stream")

COMMIT_TIMEOUT_MS = 5_000  # longest a commit (or the leave on close) may hold up the loop
COMMIT_RETRY_S = 1.0  # a failed commit is tried again this soon, new batches or not


class HeadFailed(Exception):
    """The oldest batch in flight was not delivered: retry from it (`InFlight.abandon`)."""


class InFlight:
    """Consumed batches, oldest first, until they are committed."""

    def __init__(
        self,
        limit: int,
        max_bytes: int | None = None,
        max_frames: int | None = None,
        state_barrier: bool = False,
    ) -> None:
        # Beyond this many batches, message bytes or decoded frames the consumer pauses.
        self.limit, self.max_bytes, self.max_frames = limit, max_bytes, max_frames
        self._batches: collections.deque[Batch] = collections.deque()
        self._lock = threading.Lock()
        self._uncommitted: dict[TopicPartition, int] = {}  # next offset, delivered not committed
        # Delivered, but the camera state they changed is not written yet (state_barrier).
        self._staged: dict[TopicPartition, int] = {}
        self.state_barrier = state_barrier
        self._retry_commit_at: float | None = None  # after a failed commit
        self.joined = threading.Event()  # set once the consumer was assigned partitions
        self._moves: list[tuple[str, set[Any]]] = []  # ("assigned" | "revoked", partitions)
        self.assigned = 0  # partitions assigned at the last rebalance

    def __len__(self) -> int:
        return len(self._batches)

    def full(self) -> bool:
        """Whether the consumer should pause (backpressure)."""
        if len(self._batches) >= self.limit:
            return True
        if self.max_bytes is not None and sum(b.nbytes for b in self._batches) >= self.max_bytes:
            return True
        return self.max_frames is not None and (
            sum(b.nframes for b in self._batches) >= self.max_frames
        )

    @property
    def head(self) -> Batch:
        return self._batches[0]

    def add(self, batch: Batch) -> None:
        self._batches.append(batch)

    def settle(self, recover: Callable[[Batch], bool] = lambda batch: False) -> list[Batch]:
        """Take the delivered batches at the head, in order, and remember their offsets for
        the next commit. `recover` replaces a failed head batch's records that were refused
        for good (outputs.Outputs.recover); then it waits for their stand-ins. Raises
        HeadFailed when the head batch was not delivered, and a scoring bug (an error other
        than OutputError) as it is: retrying cannot help."""
        done: list[Batch] = []
        while self._batches:
            head = self._batches[0]
            state = head.delivered()
            if state is False and recover(head):
                state = head.delivered()
            if state is None:
                break
            if state is False:
                if head.error is not None and not isinstance(head.error, OutputError):
                    raise head.error
                raise HeadFailed(head.failure())
            self._batches.popleft()
            with self._lock:
                for m in head.messages:
                    tp = TopicPartition(m.topic, m.partition)
                    self._staged[tp] = max(self._staged.get(tp, 0), m.offset + 1)
                if head.writes_state or not self.state_barrier:
                    for tp, offset in self._staged.items():
                        self._uncommitted[tp] = max(self._uncommitted.get(tp, 0), offset)
                    self._staged.clear()
            done.append(head)
        return done

    def staged(self) -> bool:
        """Delivered batches wait for a batch that writes the camera state."""
        with self._lock:
            return bool(self._staged)

    def commit(self, consumer: Any) -> None:
        """Commit the settled offsets of the partitions still assigned. A failed commit is
        logged and carried to the next one: after a restart those frames are scored again
        (duplicates, never a loss)."""
        assigned = consumer.assignment()
        with self._lock:
            offsets = {
                tp: OffsetAndMetadata(o, "", -1)
                for tp, o in self._uncommitted.items()
                if tp in assigned
            }
        try:
            if offsets:
                # Bounded: with the coordinator gone the client would retry for its request
                # timeout (5 minutes), and the loop, readiness and stop would all wait on it.
                consumer.commit(offsets, timeout_ms=COMMIT_TIMEOUT_MS)
        except KafkaError as exc:
            log.warning("commit failed (%s); these frames may be scored again", exc)
            self._retry_commit_at = time.monotonic() + COMMIT_RETRY_S
            return
        self._retry_commit_at = None
        with self._lock:  # only this (the loop's) thread adds offsets: none came in meanwhile
            self._uncommitted.clear()

    def pending(self) -> bool:
        """Offsets settled but not yet committed."""
        with self._lock:
            return bool(self._uncommitted)

    def commit_due(self) -> bool:
        """A commit failed and its retry is due (whether or not new batches came)."""
        return self._retry_commit_at is not None and time.monotonic() >= self._retry_commit_at

    def abandon(self, consumer: Any) -> list[Batch]:
        """Drop every batch in flight and seek the consumer back to their first offsets (of
        the partitions it still owns: a revoked one is its new owner's to redo)."""
        first: dict[TopicPartition, int] = {}
        for batch in self._batches:
            for m in batch.messages:
                tp = TopicPartition(m.topic, m.partition)
                first[tp] = min(first.get(tp, m.offset), m.offset)
        abandoned = list(self._batches)
        self._batches.clear()
        assigned = consumer.assignment()
        for tp, offset in first.items():
            if tp in assigned:
                consumer.seek(tp, offset)
        return abandoned

    def wait_head(self, timeout: float) -> None:
        """Block until the oldest batch is scored and its last record acknowledged, or for
        `timeout`."""
        if not self._batches:
            return
        head = self._batches[0]
        if not head.scored.wait(timeout):
            return
        pending = [f for f in head.futures if not f.is_done]
        if pending:
            with contextlib.suppress(Exception):  # failures are read by settle()
                pending[-1].get(timeout=timeout)

    # ------------------------------------------------------------------ rebalances
    def revoked(self, consumer: Any, partitions: set[Any]) -> None:
        """Commit what was settled for `partitions` (asynchronously: this runs on the client's
        IO thread, where a blocking commit is refused; it is queued ahead of the rejoin), and
        forget them."""
        with self._lock:
            pending = {tp: o for tp, o in self._uncommitted.items() if tp in partitions}
            for tp in partitions:
                self._uncommitted.pop(tp, None)
                self._staged.pop(tp, None)  # their state unwritten: the new owner redoes them
        if pending:
            offsets = {tp: OffsetAndMetadata(o, "", -1) for tp, o in pending.items()}
            consumer.commit_async(offsets, callback=_log_commit_failure)

    def lost(self, partitions: set[Any]) -> None:
        """Another member owns `partitions` now: its commits count, not ours."""
        with self._lock:
            for tp in partitions:
                self._uncommitted.pop(tp, None)
                self._staged.pop(tp, None)
            self._moves.append(("revoked", set(partitions)))

    def moved(self, kind: str, partitions: set[Any]) -> None:
        """Remember a rebalance for the loop (`take_moves`): state follows partitions."""
        if partitions:
            with self._lock:
                self._moves.append((kind, set(partitions)))

    def take_moves(self) -> list[tuple[str, set[Any]]]:
        """The partitions assigned and revoked since the last call, in order."""
        with self._lock:
            moves, self._moves = self._moves, []
        return moves

    def listener(self, consumer: Any, group_id: str) -> ConsumerRebalanceListener:
        return _Listener(self, consumer, group_id)


class _Listener(ConsumerRebalanceListener):  # type: ignore[misc]
    def __init__(self, inflight: InFlight, consumer: Any, group_id: str) -> None:
        self.inflight, self.consumer, self.group_id = inflight, consumer, group_id

    def on_partitions_revoked(self, revoked: set[Any]) -> None:
        self.inflight.revoked(self.consumer, revoked)
        self.inflight.moved("revoked", revoked)
        if revoked:
            log.info("partitions revoked: %s", partitions(revoked))

    def on_partitions_assigned(self, assigned: set[Any]) -> None:
        self.inflight.assigned = len(self.consumer.assignment())
        self.inflight.moved("assigned", assigned)
        self.inflight.joined.set()
        log.info(
            "joined group %s; assigned %s", self.group_id, partitions(assigned) or "no partitions"
        )

    def on_partitions_lost(self, lost: set[Any]) -> None:
        self.inflight.lost(lost)
        log.warning("partitions lost (group membership expired): %s", partitions(lost))


def partitions(tps: set[Any]) -> str:
    return ", ".join(f"{tp.topic}[{tp.partition}]" for tp in sorted(tps))


def _log_commit_failure(offsets: Any, error: Any) -> None:
    if isinstance(error, Exception):
        log.warning("commit before revocation failed (%s); those frames may be scored again", error)
