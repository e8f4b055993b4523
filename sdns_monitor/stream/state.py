"""Camera state that survives restarts and rebalances: a compacted changelog topic
(`--state-topic`), co-partitioned with the input, as Kafka Streams' state stores are.

- Every `state_flush_s`, a batch (`Batch.writes_state`, chosen by the loop) writes the state of
  every camera changed since the last write, keyed `TOPIC/KEY` (the input topic and the
  camera's key as text), to the partition number its frames came from. The records are part of
  that batch, and offsets are committed only up to a batch that wrote them, once they are
  acknowledged (offsets.InFlight stages the others), so the state topic never lags what was
  committed.
- When partitions are assigned (start, restart, rebalance), the scorer reads the same
  partitions of the state topic from the beginning to their end and installs the latest state
  of each camera of those input partitions before it scores their frames; on revocation it
  forgets them. Each state carries the last input offset it counted, so the frames replayed
  after a restart add no evidence twice, and an open alarm goes on under the same id.
- With several input topics (or a pattern), partition N of the state topic holds the cameras
  of partition N of every input topic, told apart by the topic in their key: give the state
  topic at least as many partitions as the widest input topic.
- A camera that expires (`camera_expiry_s`) leaves a tombstone, which compaction removes with
  its earlier states. Compaction keeps one record per camera; without it (Tansu's memory storage does not compact),
  a restore reads every state record ever written to those partitions, bounded by RESTORE_S.
"""

from __future__ import annotations

import json
import logging
import time
from typing import Any

from kafka import KafkaConsumer, TopicPartition

from sdns_monitor.settings import RunSettings

log = logging.getLogger("sdns_monitor.stream")

RESTORE_S = 120.0  # longest a restore may read before it gives up (and logs what it missed)
VERSION = 1


def state_key(topic: str, key: str | None) -> bytes:
    return f"{topic}/{'' if key is None else key}".encode()


def encode(state: dict[str, Any]) -> bytes:
    return json.dumps({"v": VERSION, **state}, separators=(",", ":")).encode()


def restore(
    settings: RunSettings, partitions: set[tuple[str, int]]
) -> tuple[list[dict[str, Any]], set[int]]:
    """The latest state of every camera of the input `partitions` ((topic, partition) pairs),
    read from the state topic's partitions of the same numbers up to their end offsets; and
    the partition numbers the state topic lacks (their cameras' state cannot be kept)."""
    assert settings.state_topic is not None
    numbers = sorted({p for _, p in partitions})
    topics = {t for t, _ in partitions}
    consumer = KafkaConsumer(
        bootstrap_servers=settings.bootstrap_servers,
        group_id=None,
        enable_auto_commit=False,
        client_id="sdns-monitor-restore",
        allow_auto_create_topics=False,
        max_poll_records=10_000,
        **settings.security.client_options(),
    )
    started = time.monotonic()
    latest: dict[bytes, bytes | None] = {}  # decoded at the end: only the last of each key
    read = 0
    try:
        tps = [TopicPartition(settings.state_topic, p) for p in numbers]
        known = consumer.partitions_for_topic(settings.state_topic) or set()
        if missing := sorted(set(numbers) - known):  # a pattern's new topic, or a shrunk one
            log.error(
                "the state topic %s has no partition %s: the cameras of those input partitions "
                "start afresh and their state cannot be written; give it at least %d partitions",
                settings.state_topic,
                ", ".join(map(str, missing)),
                max(numbers) + 1,
            )
        tps = [tp for tp in tps if tp.partition in known]
        if not tps:
            return [], set(missing)
        consumer.assign(tps)
        consumer.seek_to_beginning(*tps)
        listed = consumer.end_offsets(tps)
        while any(consumer.position(tp) < _end(consumer, tp, listed) for tp in tps):
            if time.monotonic() - started > RESTORE_S:
                log.error("camera state restore stopped after %.0f s (%d records)", RESTORE_S, read)
                break
            for batch in consumer.poll(timeout_ms=500).values():
                for m in batch:
                    read += 1
                    latest[m.key] = m.value
    finally:
        consumer.close()
    states = (json.loads(value) for value in latest.values() if value is not None)
    out = [
        s for s in states if s.get("topic") in topics and (s["topic"], s["partition"]) in partitions
    ]
    log.info(
        "restored %d cameras from %d state records of %s in %.1f s",
        len(out),
        read,
        settings.state_topic,
        time.monotonic() - started,
    )
    return out, set(missing)


def _end(consumer: KafkaConsumer, tp: TopicPartition, listed: dict[TopicPartition, int]) -> int:
    """Where `tp` ends: the larger of ListOffsets' answer and the high watermark of the fetches
    so far. Tansu lists the first offset of a partition's last batch plus one, short of the end
    when that batch holds several records; stopping there, at a poll boundary inside the batch,
    would lose the cameras after it."""
    return max(listed[tp], consumer.highwater(tp) or 0)
