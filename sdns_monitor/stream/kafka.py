"""The Kafka clients of `run`: construction, the producer's renewal after an outage, and
whether the consumer is cut off from the brokers."""

from __future__ import annotations

import logging
import math
import os
import threading
import time
from collections import Counter as Tally
from typing import Any

from kafka import ConsumerRebalanceListener, KafkaConsumer, KafkaProducer
from kafka.errors import KafkaError

from sdns_monitor.errors import BrokerUnreachable, ConfigError
from sdns_monitor.settings import RunSettings
from sdns_monitor.stream.offsets import COMMIT_TIMEOUT_MS

log = logging.getLogger("sdns_monitor.stream")


def make_consumer(s: RunSettings, listener: Any) -> KafkaConsumer:
    """The group consumer (manual commits), subscribed with the rebalance listener; `listener`
    builds the listener from the consumer."""
    consumer = KafkaConsumer(
        bootstrap_servers=s.bootstrap_servers,
        group_id=s.group_id,
        client_id=f"sdns-monitor-{os.getpid()}",
        enable_auto_commit=False,
        auto_offset_reset="earliest" if s.from_beginning else "latest",
        session_timeout_ms=s.session_timeout_ms,
        heartbeat_interval_ms=s.heartbeat_interval_ms,
        # The broker may hold a fetch this long waiting for data: keep it near the batch
        # wait, or frames of a quiet stream wait the client's 500 ms default.
        fetch_max_wait_ms=min(500, max(10, s.max_wait_ms)),
        bootstrap_timeout_ms=15_000,  # then start-up fails with one line (BrokerUnreachable)
        max_partition_fetch_bytes=max(s.max_frame_bytes + 1024, 1 << 20),
        fetch_max_bytes=max(s.max_frame_bytes * 2, 50 << 20),
        **s.security.client_options(),
    )
    rebalances: ConsumerRebalanceListener = listener(consumer)
    if s.topic_pattern:
        consumer.subscribe(pattern=s.topic_pattern, listener=rebalances)
    else:
        consumer.subscribe(topics=s.topic, listener=rebalances)
    return consumer


def make_producer(s: RunSettings) -> KafkaProducer:
    return KafkaProducer(
        bootstrap_servers=s.bootstrap_servers,
        client_id=f"sdns-monitor-{os.getpid()}",
        acks="all",
        retries=5,
        # At-least-once needs no idempotence (duplicates are allowed, losses are not), and
        # a broker that restarts with durable storage but forgets producer ids (Tansu on
        # S3 does) can answer a fresh producer's first records as duplicates: acknowledged,
        # never stored. Measured: tests/integration/test_stream_ops.py, durable outage.
        enable_idempotence=False,
        max_block_ms=10_000,  # a missing topic fails the batch (and is retried) in 10 s
        bootstrap_timeout_ms=10_000,
        request_timeout_ms=10_000,
        delivery_timeout_ms=30_000,
        max_request_size=max(s.max_frame_bytes + 64 * 1024, 1 << 20),
        **s.security.client_options(),
    )


def connect(s: RunSettings, listener: Any) -> tuple[KafkaConsumer, KafkaProducer]:
    """The consumer and the producer; a broker that does not answer at start-up is a one-line
    error (later outages are waited out instead)."""
    try:
        consumer = make_consumer(s, listener)
    except KafkaError as exc:
        raise BrokerUnreachable(
            f"no Kafka broker answered at {s.bootstrap_servers} ({type(exc).__name__}); "
            "check --bootstrap-servers, the network and the security settings"
        ) from None
    try:
        check_state_topic(s)
    except ConfigError:
        consumer.close(timeout_ms=COMMIT_TIMEOUT_MS)
        raise
    except KafkaError as exc:
        consumer.close(timeout_ms=COMMIT_TIMEOUT_MS)
        raise BrokerUnreachable(
            f"the state topic could not be checked on {s.bootstrap_servers} "
            f"({type(exc).__name__}); check --bootstrap-servers and the security settings"
        ) from None
    try:
        return consumer, make_producer(s)
    except KafkaError as exc:
        consumer.close(timeout_ms=COMMIT_TIMEOUT_MS)
        raise BrokerUnreachable(
            f"the producer could not reach {s.bootstrap_servers} ({type(exc).__name__}); "
            "check --bootstrap-servers and the security settings"
        ) from None


def check_state_topic(s: RunSettings) -> None:
    """The state topic exists and has a partition for each partition number of the input
    topics named (state.py: partition N holds the cameras of input partition N); a pattern's
    topics are checked as they are assigned (state.restore). Asked by a client of its own that
    never has a missing topic auto-created (a broker with auto-creation would make it
    uncompacted, with its default partition count)."""
    if s.state_topic is None or s.alerts != "cameras":
        return  # frame incidents keep no state there
    consumer = KafkaConsumer(
        bootstrap_servers=s.bootstrap_servers,
        group_id=None,
        client_id="sdns-monitor-check",
        allow_auto_create_topics=False,
        **s.security.client_options(),
    )
    try:
        _check_partitions(consumer, s.state_topic, s.topic)
    finally:
        consumer.close()


def _check_partitions(consumer: KafkaConsumer, state_topic: str, inputs: list[str]) -> None:
    have = consumer.partitions_for_topic(state_topic)
    if not have:
        raise ConfigError(
            f"the state topic {state_topic!r} does not exist: create it compacted "
            "(cleanup.policy=compact) with as many partitions as the widest input topic "
            "(docs/operations.md), or leave --state-topic unset"
        )
    for topic in inputs:
        need = consumer.partitions_for_topic(topic) or set()
        if need - have:
            raise ConfigError(
                f"the state topic {state_topic!r} has {len(have)} partitions and the input "
                f"topic {topic!r} {len(need)}: give the state topic at least {max(need) + 1} "
                "(kafka-topics.sh --alter --partitions), since partition N keeps the cameras of "
                "input partition N"
            )


class Producer:
    """The producer in use, replaced by a fresh one after a delivery failure: a client whose
    broker went away can keep a stale state and fail forever. Building one waits for a broker
    (up to its bootstrap timeout), so it happens on a thread of its own, holding up neither the
    loop (readiness, stop) nor the scorer, whose next batch uses it once it exists."""

    def __init__(self, settings: RunSettings, producer: Any) -> None:
        self.settings = settings
        self._current = producer
        self._lock = threading.Lock()
        self._renewing = False
        self._closed = False

    @property
    def current(self) -> Any:
        with self._lock:
            return self._current

    def renew(self) -> None:
        """Start building a fresh producer (unless one is being built already)."""
        with self._lock:
            if self._renewing or self._closed:
                return
            self._renewing = True
        threading.Thread(target=self._build, name="sdns-producer", daemon=True).start()

    def _build(self) -> None:
        try:
            fresh = make_producer(self.settings)
        except Exception as exc:  # the broker is still away: keep the old one
            log.warning("could not create a new producer (%s); retrying later", exc)
            with self._lock:
                self._renewing = False
            return
        with self._lock:
            self._renewing = False
            if self._closed:
                old = fresh
            else:
                old, self._current = self._current, fresh
        old.close(timeout=5)

    def close(self, timeout: float = 10) -> None:
        with self._lock:
            self._closed = True
            producer = self._current
        producer.close(timeout=timeout)


class ConnectionWatch:
    """Whether the consumer is cut off from the brokers: no open connection to any broker, or
    no heartbeat sent to the group coordinator, for a whole session timeout. (kafka-python
    keeps trying to send heartbeats to a coordinator it cannot reach, so heartbeats alone miss
    a broker that died; connections alone miss a lost coordinator.)"""

    def __init__(self, session_timeout_ms: int) -> None:
        self.limit_s = session_timeout_ms / 1000
        self._disconnected_since: float | None = None

    def problem(self, consumer: Any) -> str | None:
        metrics = _client_metrics(consumer)
        now = time.monotonic()
        connections = metrics.get("consumer-metrics", {}).get("connection-count")
        if connections is None or connections > 0:
            self._disconnected_since = None
        elif self._disconnected_since is None:
            self._disconnected_since = now
        elif now - self._disconnected_since > self.limit_s:
            away = now - self._disconnected_since
            return f"no connection to any broker for {away:.0f} s (broker down?)"
        ago = metrics.get("consumer-coordinator-metrics", {}).get("last-heartbeat-seconds-ago")
        if ago is None or not math.isfinite(ago) or ago <= self.limit_s:
            return None  # unknown (no heartbeat yet: inf) or recent
        return f"no heartbeat to the group coordinator for {ago:.0f} s (broker down?)"


def consumer_lag(consumer: Any) -> Tally[str]:
    """Messages behind the high watermark, per topic, of the partitions this member owns."""
    lag: Tally[str] = Tally()
    for tp in consumer.assignment():
        high = consumer.highwater(tp)
        if high is None:
            continue
        try:
            position = consumer.position(tp, timeout_ms=100)
        except Exception:  # not known yet (no fetch so far): no figure rather than a stall
            continue
        if position is not None:
            lag[tp.topic] += max(high - position, 0)
    return lag


def _client_metrics(consumer: Any) -> dict[str, Any]:
    try:
        return consumer.metrics()  # type: ignore[no-any-return]
    except Exception:  # metrics are best effort; never fail the loop over them
        return {}
