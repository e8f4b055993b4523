"""In-order commits, seek back after a failed batch and rebalances, with a fake consumer."""

from __future__ import annotations

import time

import pytest
from kafka import TopicPartition
from kafka.errors import KafkaError

from sdns_monitor.errors import OutputError
from sdns_monitor.stream import offsets
from sdns_monitor.stream.batch import Batch
from sdns_monitor.stream.offsets import HeadFailed, InFlight
from tests.sdns_monitor.stream.fakes import Consumer, Future, Message, png
from tests.sdns_monitor.stream.fakes import batch as fake_batch

T0, T1 = TopicPartition("frames", 0), TopicPartition("frames", 1)


def _batch(*where: tuple[int, int]) -> tuple[Batch, Future]:
    """A scored batch of messages at (partition, offset), with one pending record future."""
    batch = Batch([Message("frames", p, o, b"x") for p, o in where], models=None, generation=0)
    future = Future()
    batch.futures.append(future)
    batch.scored.set()
    return batch, future


def test_batches_are_committed_in_order_only_once_every_earlier_one_was_delivered() -> None:
    consumer, inflight = Consumer(("frames", 0), ("frames", 1)), InFlight(limit=4)
    (a, fa), (b, fb), (c, fc) = _batch((0, 0), (1, 0)), _batch((0, 1)), _batch((1, 1), (1, 2))
    for batch in (a, b, c):
        inflight.add(batch)
    fb.succeed()
    fc.succeed()
    assert inflight.settle() == []  # the head batch is still waiting for its acks
    assert not inflight.pending() and len(inflight) == 3
    fa.succeed()
    assert inflight.settle() == [a, b, c]
    inflight.commit(consumer)
    assert consumer.commits == [{T0: 2, T1: 3}]  # the next offset to read, per partition
    assert not inflight.pending() and len(inflight) == 0


def test_a_batch_still_being_scored_holds_the_commit() -> None:
    inflight = InFlight(limit=4)
    batch = Batch([Message("frames", 0, 5, b"x")], models=None, generation=0)
    inflight.add(batch)
    assert inflight.settle() == []
    batch.scored.set()  # no records to wait for
    assert inflight.settle() == [batch]


def test_a_failed_head_batch_is_retried_from_the_first_offsets_in_flight() -> None:
    consumer, inflight = Consumer(("frames", 0), ("frames", 1)), InFlight(limit=4)
    (a, fa), (b, fb) = _batch((0, 10), (1, 4)), _batch((0, 11), (0, 12), (1, 5))
    inflight.add(a)
    inflight.add(b)
    fb.succeed()
    fa.fail("topic refuses records")
    with pytest.raises(HeadFailed, match="1 of 1 records were not delivered"):
        inflight.settle()
    assert inflight.abandon(consumer) == [a, b]
    assert consumer.seeks == {T0: 10, T1: 4}
    assert len(inflight) == 0 and consumer.commits == []


def test_seek_back_skips_partitions_no_longer_assigned() -> None:
    consumer, inflight = Consumer(("frames", 0)), InFlight(limit=4)
    batch, _ = _batch((0, 3), (1, 7))
    inflight.add(batch)
    inflight.abandon(consumer)
    assert consumer.seeks == {T0: 3}  # partition 1 is its new owner's to redo


def test_a_scoring_bug_is_raised_as_it_is_not_retried() -> None:
    inflight = InFlight(limit=4)
    batch, _ = _batch((0, 0))
    batch.error = ZeroDivisionError("a bug")
    inflight.add(batch)
    with pytest.raises(ZeroDivisionError):
        inflight.settle()
    batch.error = OutputError("outputs not delivered")
    with pytest.raises(HeadFailed, match="outputs not delivered"):
        inflight.settle()


def test_a_failed_commit_is_carried_to_the_next_one() -> None:
    consumer, inflight = Consumer(("frames", 0)), InFlight(limit=4)
    (a, fa), (b, fb) = _batch((0, 0)), _batch((0, 1))
    inflight.add(a)
    fa.succeed()
    inflight.settle()
    consumer.fail_commits = KafkaError("coordinator moved")
    inflight.commit(consumer)  # logged, not raised: the frames may be scored again
    assert consumer.commits == [] and inflight.pending()
    consumer.fail_commits = None
    inflight.add(b)
    fb.succeed()
    inflight.settle()
    inflight.commit(consumer)
    assert consumer.commits == [{T0: 2}]


def test_revocation_mid_batch_commits_what_was_settled_for_those_partitions_only() -> None:
    consumer, inflight = Consumer(("frames", 0), ("frames", 1)), InFlight(limit=4)
    (a, fa), (b, _) = _batch((0, 0), (1, 0)), _batch((1, 1))
    inflight.add(a)
    inflight.add(b)
    fa.succeed()
    inflight.settle()  # a settled, not yet committed; b still in flight
    listener = inflight.listener(consumer, "group")
    listener.on_partitions_revoked({T1})
    assert consumer.async_commits == [{T1: 1}]
    consumer.assigned = {T0}
    inflight.commit(consumer)
    assert consumer.commits == [{T0: 1}]  # partition 1 was handed over with its commit


def test_lost_partitions_are_forgotten_without_a_commit() -> None:
    consumer, inflight = Consumer(("frames", 0)), InFlight(limit=4)
    batch, future = _batch((0, 0))
    inflight.add(batch)
    future.succeed()
    inflight.settle()
    inflight.listener(consumer, "group").on_partitions_lost({T0})
    assert not inflight.pending() and consumer.async_commits == []


def test_assignment_marks_the_consumer_joined_and_counts_partitions() -> None:
    consumer, inflight = Consumer(("frames", 0), ("frames", 1)), InFlight(limit=2)
    assert not inflight.joined.is_set()
    inflight.listener(consumer, "group").on_partitions_assigned(set())  # a standby joins too
    assert inflight.joined.is_set() and inflight.assigned == 2


def test_the_pipeline_is_full_at_its_limit() -> None:
    inflight = InFlight(limit=2)
    inflight.add(_batch((0, 0))[0])
    assert not inflight.full()
    inflight.add(_batch((0, 1))[0])
    assert inflight.full()


def test_a_failed_commit_is_due_again_without_new_batches(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(offsets, "COMMIT_RETRY_S", 0.05)
    consumer, inflight = Consumer(("frames", 0)), InFlight(limit=4)
    batch, future = _batch((0, 0))
    inflight.add(batch)
    future.succeed()
    inflight.settle()
    consumer.fail_commits = KafkaError("coordinator moved")
    inflight.commit(consumer)
    assert not inflight.commit_due()  # not at once: the coordinator may need a moment
    time.sleep(0.06)
    assert inflight.commit_due()  # the loop commits again though nothing new was settled
    consumer.fail_commits = None
    inflight.commit(consumer)
    assert consumer.commits == [{T0: 1}] and not inflight.commit_due()


def test_the_pipeline_is_full_by_bytes_or_by_frames_too() -> None:
    by_bytes = InFlight(limit=64, max_bytes=10)
    batch, _ = _batch((0, 0))  # one message of 1 byte
    by_bytes.add(batch)
    assert not by_bytes.full()
    big = Batch([Message("frames", 0, 1, b"x" * 9)], models=None, generation=0)
    by_bytes.add(big)
    assert by_bytes.full()  # 10 bytes consumed, not committed

    by_frames = InFlight(limit=64, max_frames=3)
    decoded = fake_batch([Message("frames", 0, i, png(1)) for i in range(3)])
    by_frames.add(decoded)
    assert decoded.nframes == 3 and by_frames.full()


def test_with_a_state_topic_offsets_wait_for_a_batch_that_writes_the_camera_state() -> None:
    consumer = Consumer(("frames", 0), ("frames", 1))
    inflight = InFlight(limit=4, state_barrier=True)
    (a, fa), (b, fb), (c, fc) = _batch((0, 0)), _batch((1, 0)), _batch((0, 1))
    a.writes_state = b.writes_state = False  # their cameras' state is not written yet
    for batch, future in ((a, fa), (b, fb)):
        inflight.add(batch)
        future.succeed()
    assert inflight.settle() == [a, b]
    assert inflight.staged() and not inflight.pending()  # delivered, but not committable
    inflight.add(c)  # writes the state of every camera changed since the last write
    fc.succeed()
    assert inflight.settle() == [c] and not inflight.staged()
    inflight.commit(consumer)
    assert consumer.commits == [{T0: 2, T1: 1}]


def test_staged_offsets_of_revoked_partitions_are_left_to_the_new_owner() -> None:
    consumer = Consumer(("frames", 0), ("frames", 1))
    inflight = InFlight(limit=4, state_barrier=True)
    (a, fa), (b, fb) = _batch((0, 0), (1, 0)), _batch((1, 1))
    a.writes_state = False
    inflight.add(a)
    fa.succeed()
    inflight.settle()
    inflight.revoked(consumer, {T0})  # its frames' state was never written: not committed
    inflight.add(b)
    fb.succeed()
    inflight.settle()
    inflight.commit(consumer)
    assert consumer.commits == [{T1: 2}]


def test_without_a_state_topic_every_delivered_batch_is_committable() -> None:
    inflight = InFlight(limit=4)
    a, fa = _batch((0, 0))
    a.writes_state = False
    inflight.add(a)
    fa.succeed()
    inflight.settle()
    assert inflight.pending() and not inflight.staged()
