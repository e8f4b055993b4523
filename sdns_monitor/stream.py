"""`StreamMonitor`: the consume -> decode -> score -> produce -> commit loop of `run`.

A pipeline of three kinds of thread, so that the encoder is not idle while Kafka I/O and
decoding happen:

    loop thread     poll a micro-batch -> decoder pool  ->  scorer thread
                    (owns the consumer)   (decode, resize)   (encoder, k-NN, send records)
                    commit, in order, the batches whose records were all acknowledged

At-least-once: a batch's offsets are committed only after every alert, score and dead-letter
record it caused has been acknowledged by the broker, and never past an earlier batch that is
still in flight. At most `queue_batches` batches are between consumer and commit; beyond that
the consumer pauses (backpressure) instead of buffering. When outputs cannot be delivered (a
broker outage, a topic refusing records), nothing more is committed: every batch in flight is
abandoned, the consumer seeks back to their first offsets and tries again after a backoff
(0.5 s doubling to 30 s), so memory stays bounded and nothing is lost. A frame that cannot be
decoded, or (rarely) scored, goes to the dead-letter topic with the reason; it never stops the
stream.

Counters, metrics and `on_alert` callbacks see a batch only once it was delivered, so a retried
batch is not counted twice. Incident state is rolled back with a failed batch for the same
reason: the retried batch sends the alerts the failed one could not.

Hot reload: `reload()` (SIGHUP in `run`), or a change of the bundle at the model path, loads
the new bundle on a background thread while the loop goes on; batches consumed from then on
use it, and the batches in flight finish on the old model. A bundle that fails to load is
logged and the old model stays.
"""

from __future__ import annotations

import base64
import collections
import concurrent.futures
import contextlib
import logging
import math
import os
import queue
import re
import threading
import time
from collections import Counter as Tally
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from sdns_monitor.detector import Detector
from sdns_monitor.errors import FrameError, SdnsError
from sdns_monitor.frames import decode_bytes
from sdns_monitor.incidents import IncidentTracker
from sdns_monitor.metrics import HealthServer, Metrics
from sdns_monitor.records import (
    Alert,
    ModelRef,
    ScoreRecord,
    Source,
    dead_letter_headers,
    encode_key,
)
from sdns_monitor.routing import Models
from sdns_monitor.scoring import cannot_flag
from sdns_monitor.settings import RunSettings

log = logging.getLogger("sdns_monitor.stream")

IDLE_POLL_MS = 500  # how long an empty poll waits before the loop looks around again
BACKOFF_S = (0.5, 30.0)  # first and longest wait between delivery retries
STALL_S = 300.0  # /healthz fails when the loop has not come round for this long
GAUGES_EVERY_S = 0.5  # how often readiness, lag and incident gauges are refreshed
COMMIT_TIMEOUT_MS = 5_000  # longest a commit (or the leave on close) may hold up the loop


class OutputError(SdnsError):
    """Alerts, scores or dead letters could not be delivered; nothing was committed."""


class BrokerUnreachable(SdnsError):
    """No Kafka broker answered when the monitor started."""


@dataclass
class StreamStats:
    messages: int = 0
    frames: int = 0
    alerts: int = 0  # alerts sent (flagged frames inside an incident's cooldown send none)
    flagged: int = 0
    incidents_closed: int = 0
    dead_letters: int = 0
    batches: int = 0
    output_failures: int = 0  # batches retried because outputs were not acknowledged
    reloads: int = 0
    reload_failures: int = 0  # bundles refused on reload (the old model stayed)
    started: float = field(default_factory=time.monotonic)
    busy_from: float | None = None  # when the first frame's batch was consumed
    busy_until: float | None = None  # when the last frame's batch was delivered

    def frames_per_second(self) -> float:
        """Frames over the time from the first frame consumed to the last one delivered (not
        from start-up: model loading and an idle topic are not throughput)."""
        if self.busy_from is None or self.busy_until is None:
            return 0.0
        return self.frames / max(self.busy_until - self.busy_from, 1e-9)

    def summary(self) -> str:
        return (
            f"{self.messages} messages, {self.frames} frames, {self.flagged} flagged, "
            f"{self.alerts} alerts, {self.dead_letters} dead letters, "
            f"{self.frames_per_second():.1f} frames/s"
        )


@dataclass
class _Frame:
    source: Source
    key: bytes | None  # the message key as it came: outputs are keyed by it
    image: np.ndarray  # uint8 1 x S x S x C, prepared for the encoder
    detector: Detector  # the model of its key (routing)


@dataclass
class _Batch:
    """One micro-batch on its way through the pipeline, and what it did. Stats, metrics and
    callbacks see it only once every record it caused was acknowledged."""

    messages: list[Any]
    models: Models  # the models that prepare and score it, fixed when it was consumed
    generation: int  # batches of an older generation were abandoned after a failure
    started: float = field(default_factory=time.monotonic)
    decoded: (
        concurrent.futures.Future[tuple[list[_Frame], list[tuple[Any, FrameError, Source]]]] | None
    ) = None
    scored: threading.Event = field(default_factory=threading.Event)
    error: BaseException | None = None  # raised while scoring (OutputError or a bug)
    snapshot: dict[Any, Any] | None = None  # incident state before this batch was scored
    futures: list[Any] = field(default_factory=list)
    messages_by_topic: Tally[str] = field(default_factory=Tally)
    frames: Tally[str] = field(default_factory=Tally)
    flagged: Tally[str] = field(default_factory=Tally)
    alerts: list[Alert] = field(default_factory=list)
    dead_letters: Tally[str] = field(default_factory=Tally)  # per error class
    incidents_closed: int = 0
    closed_ids: list[str] = field(default_factory=list)

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


class StreamMonitor:
    """Watch the configured topics and publish alerts for out-of-distribution frames.

    Blocking, as `run` does it:

    >>> StreamMonitor(settings).run()              # until SIGTERM's handler calls stop()

    Embedded in a service:

    >>> monitor = StreamMonitor(settings, on_alert=lambda alert: print(alert.score)).start()
    >>> ...
    >>> stats = monitor.stop()                     # finishes the batch in flight, commits
    """

    def __init__(
        self,
        settings: RunSettings,
        detector: Detector | None = None,
        on_alert: Callable[[Alert], None] | None = None,
    ) -> None:
        self.settings = settings
        reuse = None if detector is None else Models(detector)
        self.models = Models.load(
            settings.model,
            settings.routes,
            self._load,
            reuse,
            changed=None if detector is None else set(),
        )
        self.on_alert = on_alert
        self.stats = StreamStats()
        self.metrics = Metrics()
        self.metrics.set_models([(d.name, d.hash) for d in self.models.unique()])
        self.incidents = IncidentTracker(settings.incident_window_s, settings.incident_cooldown_s)
        self.health: HealthServer | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._error: BaseException | None = None
        self._joined = threading.Event()
        self._output_problem: str | None = None
        self._broker_problem: str | None = None
        self._renewing = False  # a new producer is being built (_renew_producer)
        self._disconnected_since: float | None = None  # see _cut_off
        self._last_loop = time.monotonic()
        self._uncommitted: dict[Any, int] = {}  # partition -> next offset, delivered not committed
        self._inflight: collections.deque[_Batch] = collections.deque()  # consumed, not committed
        self._to_score: queue.Queue[_Batch | None] = queue.Queue()
        self._score_lock = threading.Lock()  # the scorer's state: incidents, generation
        self._stats_lock = threading.Lock()
        self._generation = 0
        self._out: Any = None  # the producer; replaced after a delivery failure
        self._reload_lock = threading.Lock()
        # (the default model's path, the paths to load again: None for all) of a reload
        self._reload_request: tuple[Path, set[Path] | None] | None = None
        self._loading: concurrent.futures.Future[Models] | None = None
        self._loader = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="sdns-reload")
        self._signatures = {p: _signature(p) for p in self._paths()}
        self._next_reload_check = time.monotonic() + settings.reload_check_s
        self._log_throttle = _Throttle(10.0)

    def _load(self, path: Path) -> Detector:
        s = self.settings
        det = Detector.load(
            path,
            device=s.device,
            score=s.score,
            backend=s.backend,
            cache_dir=s.cache_dir,
            batch_size=max(s.batch_size, 64),
            public_key=s.public_key,
            require_signed=s.require_signed,
        )
        if s.threshold is None:
            rate = s.alarm_rate if s.alarm_rate is not None else det.alarm_rate
            if (problem := cannot_flag(len(det.calibration), rate)) is not None:
                log.warning("model %s: %s", det.name, problem)
        signed = f"signed by {det.bundle.signed_by}" if det.bundle.signed_by else "unsigned"
        log.info(
            "model %s (%s, %s): score %s, backend %s on %s",
            det.name,
            det.hash[:12],
            signed,
            det.score_mode,
            det.backend,
            det.device,
        )
        return det

    @property
    def detector(self) -> Detector:
        """The default model (for keys no route matches)."""
        return self.models.default

    def _paths(self) -> list[Path]:
        return [self.settings.model, *(r.model for r in self.settings.routes)]

    # ------------------------------------------------------------------ embedding API
    def start(self) -> StreamMonitor:
        """Run the loop on a background thread; returns at once."""
        if self._thread is not None:
            raise RuntimeError("this StreamMonitor was already started")

        def target() -> None:
            try:
                self.run()
            except BaseException as exc:  # surfaced by stop()
                self._error = exc
                log.error("monitor stopped: %s", exc)

        self._thread = threading.Thread(target=target, name="sdns-monitor", daemon=True)
        self._thread.start()
        return self

    def request_stop(self) -> None:
        """Ask the loop to finish its batch and return (safe in a signal handler)."""
        self._stop.set()

    def stop(self, timeout: float = 60.0) -> StreamStats:
        """Finish the batch in flight, commit, leave the group; re-raises a loop failure."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout)
            if self._thread.is_alive():
                raise TimeoutError(f"the monitor did not stop within {timeout:.0f} s")
        if self._error is not None:
            raise self._error
        return self.stats

    @property
    def error(self) -> BaseException | None:
        """What stopped a `start()`ed loop, if it failed."""
        return self._error

    def wait_ready(self, timeout: float) -> bool:
        """True once the consumer has joined its group (the model is loaded already)."""
        return self._joined.wait(timeout)

    def reload(self, path: str | Path | None = None, *, changed: set[Path] | None = None) -> None:
        """Load the bundles again (all of them, or those at the `changed` paths) and swap them
        in between batches; with `path`, the default model comes from there instead. Safe to
        call from a signal handler or another thread."""
        default = Path(path) if path is not None else self.settings.model
        if path is not None and changed is not None:
            changed = changed | {default}
        with self._reload_lock:
            self._reload_request = (default, changed)

    def not_ready(self) -> str | None:
        """None when ready, else why not (what `/readyz` answers)."""
        if not self._joined.is_set():
            return "not ready: the consumer has not joined its group yet"
        if self._output_problem is not None:
            return f"not ready: {self._output_problem}"
        if self._broker_problem is not None:
            return f"not ready: {self._broker_problem}"
        return None

    def not_alive(self) -> str | None:
        stalled = time.monotonic() - self._last_loop
        if stalled > STALL_S:
            return f"not alive: the loop has not come round for {stalled:.0f} s"
        return None

    # ------------------------------------------------------------------ clients
    def _consumer(self) -> Any:
        from kafka import KafkaConsumer

        s = self.settings
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
        listener = _rebalance_listener(self, consumer)
        if s.topic_pattern:
            consumer.subscribe(pattern=s.topic_pattern, listener=listener)
        else:
            consumer.subscribe(topics=s.topic, listener=listener)
        return consumer

    def _connect(self) -> tuple[Any, Any]:
        """The consumer and the producer; a broker that does not answer at start-up is a
        one-line error (later outages are waited out instead)."""
        from kafka.errors import KafkaError

        try:
            consumer = self._consumer()
        except KafkaError as exc:
            raise BrokerUnreachable(
                f"no Kafka broker answered at {self.settings.bootstrap_servers} "
                f"({type(exc).__name__}); check --bootstrap-servers, the network and the "
                "security settings"
            ) from None
        try:
            return consumer, self._producer()
        except KafkaError as exc:
            consumer.close(timeout_ms=COMMIT_TIMEOUT_MS)
            raise BrokerUnreachable(
                f"the producer could not reach {self.settings.bootstrap_servers} "
                f"({type(exc).__name__}); check --bootstrap-servers and the security settings"
            ) from None

    def _producer(self) -> Any:
        from kafka import KafkaProducer

        return KafkaProducer(
            bootstrap_servers=self.settings.bootstrap_servers,
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
            max_request_size=max(self.settings.max_frame_bytes + 64 * 1024, 1 << 20),
            **self.settings.security.client_options(),
        )

    # ------------------------------------------------------------------ loop
    def run(
        self, stop: threading.Event | None = None, idle_exit_s: float | None = None
    ) -> StreamStats:
        """Consume until `stop` (or `self.stop()`) is set, or nothing arrived for `idle_exit_s`
        seconds after joining the group."""
        stop = stop or self._stop
        s = self.settings
        if s.metrics_port is not None:
            self.health = HealthServer(
                self.metrics, self.not_alive, self.not_ready, s.metrics_host, s.metrics_port
            ).start()
        consumer = None
        decoders = concurrent.futures.ThreadPoolExecutor(
            s.decode_workers, thread_name_prefix="sdns-decode"
        )
        try:
            consumer, self._out = self._connect()
            scorer = threading.Thread(target=self._score_loop, name="sdns-score", daemon=True)
            scorer.start()
            try:
                self._loop(consumer, decoders, stop, idle_exit_s)
            finally:
                self._to_score.put(None)  # the scorer finishes what it has, then stops
                scorer.join(timeout=60)
        finally:
            self._joined.clear()
            self.metrics.ready.set(0)
            decoders.shutdown(wait=False, cancel_futures=True)
            if self._out is not None:
                self._out.close(timeout=10)
            if consumer is not None:
                # Leaves the group, so partitions move on at once (bounded: the broker may be down).
                consumer.close(timeout_ms=COMMIT_TIMEOUT_MS)
            if self.health is not None:
                self.health.stop()
            self._loader.shutdown(wait=False, cancel_futures=True)
        return self.stats

    def _loop(
        self,
        consumer: Any,
        decoders: concurrent.futures.Executor,
        stop: threading.Event,
        idle_exit_s: float | None,
    ) -> None:
        """Consume and hand micro-batches to the decoders and the scorer; commit, in order,
        what was delivered. At most `queue_batches` batches are between consumer and commit:
        beyond that the consumer pauses (backpressure) instead of buffering."""
        s = self.settings
        last_data = time.monotonic()
        backoff = BACKOFF_S[0]
        paused = False
        next_gauges = 0.0
        while not stop.is_set():
            self._last_loop = now = time.monotonic()
            if now >= next_gauges:  # every path of the loop, backpressure and retries included
                self._update_gauges(consumer)
                next_gauges = now + GAUGES_EVERY_S
            self._maybe_reload()
            if self._settle(consumer) is False:
                self._retry_later(consumer, backoff, stop)
                backoff = min(backoff * 2, BACKOFF_S[1])
                continue
            if len(self._inflight) >= s.queue_batches:
                consumer.pause(*consumer.assignment())  # again: a rebalance may add partitions
                paused = True
                polled = consumer.poll(timeout_ms=0)  # keeps the group membership alive
                stray = [m for batch in polled.values() for m in batch]
                if stray:  # whatever the consumer hands out is scored, never dropped
                    self._submit(stray, decoders)
                self._wait_head(0.05)
                continue
            if paused:
                consumer.resume(*consumer.paused())
                paused = False
            messages = self._collect(consumer, stop)
            if not messages:
                if not self._joined.is_set() or self._inflight:
                    last_data = time.monotonic()  # idle time counts once in the group, empty
                elif idle_exit_s is not None and time.monotonic() - last_data > idle_exit_s:
                    break
                continue
            last_data = time.monotonic()
            if self._output_problem is None:
                backoff = BACKOFF_S[0]
            self._submit(messages, decoders)
        self._drain(consumer)

    def _submit(self, messages: list[Any], decoders: concurrent.futures.Executor) -> None:
        """Send a micro-batch down the pipeline (decoders, then the scorer)."""
        batch = _Batch(messages, self.models, self._generation)
        batch.decoded = decoders.submit(self._decode_all, messages, batch.models)
        self._inflight.append(batch)
        self._to_score.put(batch)

    def _drain(self, consumer: Any, timeout: float = 60.0) -> None:
        """On stop: let the batches in flight finish, then commit them."""
        deadline = time.monotonic() + timeout
        self._out.flush(timeout=max(deadline - time.monotonic(), 0))
        while self._inflight and time.monotonic() < deadline:
            if self._settle(consumer) is False:
                log.warning("stopping with undelivered outputs; their frames were not committed")
                return
            self._wait_head(0.05)

    def _wait_head(self, timeout: float) -> None:
        """Block until the oldest batch in flight is scored and acknowledged (or `timeout`)."""
        if not self._inflight:
            return
        head = self._inflight[0]
        if not head.scored.wait(timeout):
            return
        pending = [f for f in head.futures if not f.is_done]
        if pending:
            with contextlib.suppress(Exception):  # failures are read by _settle
                pending[-1].get(timeout=timeout)

    def _collect(self, consumer: Any, stop: threading.Event) -> list[Any]:
        """A micro-batch: up to `batch_size` messages, waiting at most `max_wait_ms` after the
        first one arrived. Returns [] when nothing arrived within IDLE_POLL_MS."""
        s = self.settings
        out: list[Any] = []
        deadline: float | None = None
        idle_ms = IDLE_POLL_MS if not self._inflight else 5  # keep committing while busy
        while len(out) < s.batch_size and not stop.is_set():
            if deadline is None:
                timeout_ms = idle_ms
            else:
                timeout_ms = int((deadline - time.monotonic()) * 1000)
                if timeout_ms <= 0:
                    break
            polled = consumer.poll(timeout_ms=timeout_ms, max_records=s.batch_size - len(out))
            got = [m for batch in polled.values() for m in batch]
            if got and deadline is None:
                deadline = time.monotonic() + s.max_wait_ms / 1000
            elif not got and deadline is None:
                break
            out.extend(got)
        return out

    def _settle(self, consumer: Any) -> bool | None:
        """Commit the delivered batches at the head of the pipeline, in order. False when the
        head batch failed (the caller retries), else None."""
        from kafka import OffsetAndMetadata, TopicPartition
        from kafka.errors import KafkaError

        progressed = False
        while self._inflight:
            head = self._inflight[0]
            state = head.delivered()
            if state is None:
                break
            if state is False:
                if head.error is not None and not isinstance(head.error, OutputError):
                    raise head.error  # a bug, not a delivery problem: retrying cannot help
                return False
            self._inflight.popleft()
            for m in head.messages:
                tp = TopicPartition(m.topic, m.partition)
                self._uncommitted[tp] = max(self._uncommitted.get(tp, 0), m.offset + 1)
            self._apply(head)
            self.metrics.batch_latency.observe(time.monotonic() - head.started)
            progressed = True
        if not progressed or not self._uncommitted:
            return None
        if self._output_problem is not None:
            log.info("outputs delivered again; resuming")
            self._output_problem = None
        assigned = consumer.assignment()
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
            # Delivered but not committed: after a rebalance or restart the batch is scored
            # again (duplicates, never a loss). The next commit carries these offsets along.
            log.warning("commit failed (%s); these frames may be scored again", exc)
            return None
        self._uncommitted.clear()
        return None

    def _retry_later(self, consumer: Any, backoff: float, stop: threading.Event) -> None:
        """The head batch was not delivered: abandon every batch in flight, restore the
        incident state from before them, seek back to their first offsets and wait. They are
        consumed and scored again; nothing after them was committed."""
        from kafka import TopicPartition

        head = self._inflight[0]
        problem = head.failure()
        with self._score_lock:
            self._generation += 1  # the scorer skips what is still queued
            if head.snapshot is not None:
                self.incidents.restore(head.snapshot)
        self._renew_producer()
        first: dict[Any, int] = {}
        for batch in self._inflight:
            for m in batch.messages:
                tp = TopicPartition(m.topic, m.partition)
                first[tp] = min(first.get(tp, m.offset), m.offset)
        self._inflight.clear()
        assigned = consumer.assignment()
        for tp, offset in first.items():
            if tp in assigned:  # a revoked partition is its new owner's to redo
                consumer.seek(tp, offset)
        self.stats.output_failures += 1
        self.metrics.output_failures.inc()
        self._output_problem = f"outputs not delivered ({problem})"
        self.metrics.ready.set(0)
        log.error("%s; offsets not committed, retrying in %.1f s", problem, backoff)
        stop.wait(backoff)

    def _renew_producer(self) -> None:
        """Build a fresh producer for the retries, on a thread of its own: a client whose
        broker went away can keep a stale state and fail forever, and building one waits for a
        broker (up to its bootstrap timeout), which must hold up neither the loop (readiness,
        stop) nor the scorer. The scorer's next batch uses it once it exists."""
        with self._score_lock:
            if self._renewing:
                return
            self._renewing = True

        def build() -> None:
            try:
                fresh = self._producer()
            except Exception as exc:  # the broker is still away: keep the old one
                log.warning("could not create a new producer (%s); retrying later", exc)
                with self._score_lock:
                    self._renewing = False
                return
            with self._score_lock:
                self._renewing = False
                if self._stop.is_set() or self._out is None:  # stopping: run() closes _out
                    old = fresh
                else:
                    old, self._out = self._out, fresh
            old.close(timeout=5)

        threading.Thread(target=build, name="sdns-producer", daemon=True).start()

    def _cut_off(self, consumer: Any) -> str | None:
        """Why the consumer is cut off from the brokers, if it is: no open connection to any
        broker, or no heartbeat sent to the group coordinator, for a whole session timeout.
        (kafka-python keeps trying to send heartbeats to a coordinator it cannot reach, so
        heartbeats alone miss a broker that died; connections alone miss a lost coordinator.)"""
        metrics = _client_metrics(consumer)
        limit_s = self.settings.session_timeout_ms / 1000
        now = time.monotonic()
        connections = metrics.get("consumer-metrics", {}).get("connection-count")
        if connections is None or connections > 0:
            self._disconnected_since = None
        elif self._disconnected_since is None:
            self._disconnected_since = now
        elif now - self._disconnected_since > limit_s:
            away = now - self._disconnected_since
            return f"no connection to any broker for {away:.0f} s (broker down?)"
        ago = metrics.get("consumer-coordinator-metrics", {}).get("last-heartbeat-seconds-ago")
        if ago is None or not math.isfinite(ago) or ago <= limit_s:
            return None  # unknown (no heartbeat yet: inf) or recent
        return f"no heartbeat to the group coordinator for {ago:.0f} s (broker down?)"

    def _update_gauges(self, consumer: Any) -> None:
        self._broker_problem = self._cut_off(consumer)
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
        # Only the topics this member owns now: a stale figure for a topic whose partitions
        # moved to another member would be summed twice by an autoscaler.
        self.metrics.consumer_lag.clear()
        for topic, value in lag.items():
            self.metrics.consumer_lag.labels(topic=topic).set(value)
        self.metrics.incidents_open.set(self.incidents.open_count)
        self.metrics.ready.set(0 if self.not_ready() else 1)

    # ------------------------------------------------------------------ decode and score
    def _decode_all(
        self, messages: list[Any], models: Models
    ) -> tuple[list[_Frame], list[tuple[Any, FrameError, Source]]]:
        """On a decoder thread: frames prepared for the model of their key, and the
        undecodable messages."""
        frames: list[_Frame] = []
        dead: list[tuple[Any, FrameError, Source]] = []
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
                images = detector.prepare(self._decode(m))
            except FrameError as exc:
                dead.append((m, exc, Source(**base)))
                continue
            for i in range(images.shape[0]):
                source = Source(**base, frame_index=i)
                frames.append(_Frame(source, m.key, images[i : i + 1], detector))
        return frames, dead

    def _decode(self, message: Any) -> np.ndarray:
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
        return decode_bytes(value, content_type.decode("latin-1") if content_type else None)

    def _score_loop(self) -> None:
        """The scorer thread: scores queued batches in order and sends their records."""
        while True:
            try:
                batch = self._to_score.get(timeout=IDLE_POLL_MS / 1000)
            except queue.Empty:
                if self.incidents.open_count and self._output_problem is None:
                    self._close_quiet_incidents(self._out)
                continue
            if batch is None:
                return
            with self._score_lock:
                if batch.generation != self._generation:
                    batch.error = OutputError("abandoned after an earlier batch failed")
                else:
                    self._score_batch(batch, self._out)
            batch.scored.set()

    def _score_batch(self, batch: _Batch, producer: Any) -> None:
        from kafka.errors import KafkaError

        batch.snapshot = self.incidents.snapshot()
        try:
            assert batch.decoded is not None
            frames, dead = batch.decoded.result()
            for m in batch.messages:
                batch.messages_by_topic[m.topic] += 1
            for message, exc, source in dead:
                batch.futures.append(self._dead_letter(producer, message, exc, source))
                batch.dead_letters[type(exc).__name__] += 1
            if frames:
                self._score(frames, batch, producer)
            self._close_incidents(producer, batch)
        except KafkaError as exc:  # raised by send() itself: e.g. no metadata for a topic
            batch.error = OutputError(f"{type(exc).__name__}: {exc}")
        except BaseException as exc:  # a bug: surfaced by the loop, which stops
            batch.error = exc
            log.exception("scoring a batch failed")

    def process(self, messages: list[Any], producer: Any) -> None:
        """Score one micro-batch synchronously and deliver every record it causes
        (acknowledged), or raise OutputError having changed nothing but the broker's topics.
        For embedding without a consumer; `run` pipelines the same steps."""
        batch = _Batch(messages, self.models, self._generation)
        done: concurrent.futures.Future[Any] = concurrent.futures.Future()
        done.set_result(self._decode_all(messages, batch.models))
        batch.decoded = done
        with self._score_lock:
            self._score_batch(batch, producer)
        producer.flush()
        batch.scored.set()
        if not batch.delivered():
            if batch.snapshot is not None:
                self.incidents.restore(batch.snapshot)
            if isinstance(batch.error, OutputError) or batch.error is None:
                raise OutputError(batch.failure())
            raise batch.error
        self._apply(batch)

    def _dead_letter(self, producer: Any, message: Any, exc: BaseException, source: Source) -> Any:
        kind = str(exc).split(":")[0][:60]  # the reason, e.g. "empty message value"
        if self._log_throttle.ready(kind):
            suppressed = self._log_throttle.take_suppressed(kind)
            more = f" (and {suppressed} more like it)" if suppressed else ""
            log.warning(
                "dead letter %s[%d]@%d: %s%s",
                source.topic,
                source.partition,
                source.offset,
                exc,
                more,
            )
        value = message.value
        if value is not None and len(value) > self.settings.max_frame_bytes:
            value = None  # too large for the producer: the headers still say where it was
        return producer.send(
            self.settings.dlq_topic,
            key=message.key,
            value=value,
            headers=dead_letter_headers(list(message.headers or []), exc, source),
        )

    def _score(self, frames: list[_Frame], batch: _Batch, producer: Any) -> None:
        """Score the frames model by model; send their records in offset order."""
        s = self.settings
        verdicts: dict[int, tuple[float, float, bool, float | None, float | None]] = {}
        for detector in {id(f.detector): f.detector for f in frames}.values():
            mine = [f for f in frames if f.detector is detector]
            try:
                scores = detector.anomaly_scores(np.concatenate([f.image for f in mine]))
            except Exception:
                mine, scores = self._score_one_by_one(mine, batch, producer)
                if not mine:
                    continue
            result = detector.result(scores, alarm_rate=s.alarm_rate, threshold=s.threshold)
            for i, frame in enumerate(mine):
                verdicts[id(frame)] = (
                    float(result.scores[i]),
                    float(result.p_values[i]),
                    bool(result.flags[i]),
                    result.alarm_rate,
                    result.threshold,
                )
        now_ms = int(time.time() * 1000)
        for frame in frames:
            if id(frame) not in verdicts:  # dead-lettered by _score_one_by_one
                continue
            score, p_value, flagged, alarm_rate, threshold = verdicts[id(frame)]
            model = ModelRef(hash=frame.detector.hash, name=frame.detector.name)
            topic = frame.source.topic
            batch.frames[topic] += 1
            if s.scores_topic:
                record = ScoreRecord(
                    source=frame.source, score=score, p_value=p_value, flagged=flagged, model=model
                )
                batch.futures.append(
                    producer.send(s.scores_topic, key=frame.key, value=_json(record))
                )
            if not flagged:
                continue
            batch.flagged[topic] += 1
            incident, send = self.incidents.flagged(
                frame.source.key, frame.source.key_encoding, now_ms
            )
            if not send:
                continue
            alert = Alert(
                source=frame.source,
                score=score,
                p_value=p_value,
                alarm_rate=alarm_rate,
                threshold=threshold,
                model=model,
                detected_at_ms=now_ms,
                incident=incident,
            )
            batch.alerts.append(alert)
            batch.futures.append(producer.send(s.alert_topic, key=frame.key, value=_json(alert)))

    def _score_one_by_one(
        self, frames: list[_Frame], batch: _Batch, producer: Any
    ) -> tuple[list[_Frame], np.ndarray]:
        """The batch could not be scored: score frame by frame and dead-letter the frames that
        fail, so that one frame never stops the stream."""
        kept, scores = [], []
        for frame in frames:
            try:
                scores.append(frame.detector.anomaly_scores(frame.image)[0])
                kept.append(frame)
            except Exception as exc:
                log.exception(
                    "scoring failed for %s[%d]@%d",
                    frame.source.topic,
                    frame.source.partition,
                    frame.source.offset,
                )
                message = next(
                    m
                    for m in batch.messages
                    if (m.topic, m.partition, m.offset)
                    == (frame.source.topic, frame.source.partition, frame.source.offset)
                )
                error = FrameError(f"scoring failed: {type(exc).__name__}: {exc}")
                batch.futures.append(self._dead_letter(producer, message, error, frame.source))
                batch.dead_letters["ScoringError"] += 1
        return kept, np.asarray(scores, dtype=np.float64)

    def _close_incidents(self, producer: Any, batch: _Batch) -> None:
        """Send a closing record for every incident whose key has been quiet for a window."""
        for closed in self.incidents.expire(int(time.time() * 1000)):
            batch.incidents_closed += 1
            batch.closed_ids.append(f"{closed.incident_id} ({closed.frames} flagged frames)")
            key = None if closed.key is None else _raw_key(closed.key, closed.key_encoding)
            batch.futures.append(
                producer.send(self.settings.alert_topic, key=key, value=_json(closed))
            )

    def _close_quiet_incidents(self, producer: Any) -> None:
        """On the scorer thread of an idle stream: close quiet incidents (retried next time
        if their records are not delivered)."""
        try:
            self.process([], producer)
        except OutputError as exc:
            log.error("%s; will try again", exc)

    def _apply(self, batch: _Batch) -> None:
        with self._stats_lock:  # the loop and, for incident closings, the scorer call this
            self._apply_locked(batch)

    def _apply_locked(self, batch: _Batch) -> None:
        st, m = self.stats, self.metrics
        st.messages += sum(batch.messages_by_topic.values())
        if batch.frames:
            if st.busy_from is None:
                st.busy_from = batch.started
            st.busy_until = time.monotonic()
        st.frames += sum(batch.frames.values())
        st.flagged += sum(batch.flagged.values())
        st.alerts += len(batch.alerts)
        st.dead_letters += sum(batch.dead_letters.values())
        st.incidents_closed += batch.incidents_closed
        for closed in batch.closed_ids:  # logged once delivered, not on every attempt
            log.info("incident %s closed", closed)
        if batch.messages:
            st.batches += 1
        for topic, n in batch.messages_by_topic.items():
            m.messages.labels(topic=topic).inc(n)
        for topic, n in batch.frames.items():
            m.frames.labels(topic=topic).inc(n)
        for topic, n in batch.flagged.items():
            m.flagged.labels(topic=topic).inc(n)
        for alert in batch.alerts:
            m.alerts.labels(topic=alert.source.topic).inc()
        for reason, n in batch.dead_letters.items():
            m.dead_letters.labels(reason=reason).inc(n)
        m.scored(sum(batch.frames.values()))
        if self.on_alert is not None:
            for alert in batch.alerts:
                try:
                    self.on_alert(alert)
                except Exception:  # a callback's bug must not stop the stream
                    log.exception("on_alert callback failed")

    # ------------------------------------------------------------------ hot reload
    def _maybe_reload(self) -> None:
        s = self.settings
        if s.reload_check_s > 0 and time.monotonic() >= self._next_reload_check:
            self._next_reload_check = time.monotonic() + s.reload_check_s
            touched: set[Path] = set()
            for path in self._paths():
                signature = _signature(path)
                if signature != self._signatures.get(path) and signature is not None:
                    log.info("the bundle at %s changed; reloading", path)
                    self._signatures[path] = signature
                    touched.add(path)
            if touched:
                self.reload(changed=touched)
        with self._reload_lock:
            request, self._reload_request = self._reload_request, None
        if request is not None and self._loading is None:
            default, changed = request
            self._loading = self._loader.submit(
                Models.load, default, s.routes, self._load, self.models, changed
            )
        elif request is not None:  # one load at a time: ask again once this one is done
            with self._reload_lock:
                self._reload_request = self._reload_request or request
        if self._loading is None or not self._loading.done():
            return
        loading, self._loading = self._loading, None
        try:
            new = loading.result()
        except (SdnsError, OSError) as exc:
            self.metrics.reloads.labels(result="failed").inc()
            self.stats.reload_failures += 1
            log.error("reload failed, keeping the models in use: %s", exc)
            return
        old, self.models = self.models, new
        self.metrics.set_models([(d.name, d.hash) for d in new.unique()])
        self.metrics.reloads.labels(result="ok").inc()
        self.stats.reloads += 1
        before = {d.hash for d in old.unique()}
        for det in new.unique():
            if det.hash not in before:
                log.info("model reloaded: %s %s", det.name, det.hash[:12])


def _rebalance_listener(monitor: StreamMonitor, consumer: Any) -> Any:
    """Readiness on join; on revocation, commit what was delivered but not yet committed."""
    from kafka import ConsumerRebalanceListener, OffsetAndMetadata

    class Listener(ConsumerRebalanceListener):  # type: ignore[misc]
        # Runs on kafka-python's IO thread, where a blocking commit() is refused: the commit is
        # queued asynchronously, ahead of the group rejoin on the same connection. In the
        # sequential loop every delivered batch is committed before the next poll, so this
        # only matters after a commit failed.
        def on_partitions_revoked(self, revoked: set[Any]) -> None:
            pending = {tp: o for tp, o in list(monitor._uncommitted.items()) if tp in revoked}
            if pending:
                offsets = {tp: OffsetAndMetadata(o, "", -1) for tp, o in pending.items()}
                consumer.commit_async(offsets, callback=_log_commit_failure)
            for tp in revoked:
                monitor._uncommitted.pop(tp, None)
            if revoked:
                log.info("partitions revoked: %s", _partitions(revoked))

        def on_partitions_assigned(self, assigned: set[Any]) -> None:
            monitor._joined.set()
            monitor.metrics.assigned_partitions.set(len(consumer.assignment()))
            log.info(
                "joined group %s; assigned %s",
                monitor.settings.group_id,
                _partitions(assigned) or "no partitions",
            )

        def on_partitions_lost(self, lost: set[Any]) -> None:
            for tp in lost:  # another member owns them now: its commits count, not ours
                monitor._uncommitted.pop(tp, None)
            log.warning("partitions lost (group membership expired): %s", _partitions(lost))

    return Listener()


def _client_metrics(consumer: Any) -> dict[str, Any]:
    try:
        return consumer.metrics()  # type: ignore[no-any-return]
    except Exception:  # metrics are best effort; never fail the loop over them
        return {}


def _log_commit_failure(offsets: Any, error: Any) -> None:
    if isinstance(error, Exception):
        log.warning("commit before revocation failed (%s); those frames may be scored again", error)


class _Throttle:
    """At most one log line per key per `every_s`; counts what it held back."""

    def __init__(self, every_s: float) -> None:
        self.every_s = every_s
        self._last: dict[str, float] = {}
        self._held: Tally[str] = Tally()

    def ready(self, key: str) -> bool:
        now = time.monotonic()
        if now - self._last.get(key, -self.every_s) >= self.every_s:
            self._last[key] = now
            return True
        self._held[key] += 1
        return False

    def take_suppressed(self, key: str) -> int:
        return self._held.pop(key, 0)


class ClientLogThrottle(logging.Filter):
    """For the handlers of `run`: the Kafka client logs every failed reconnect (several lines
    a second while a broker is down). Passes the first line of each kind (digits ignored),
    then one per `every_s` with how many were held back; other loggers pass untouched."""

    def __init__(self, every_s: float = 60.0, prefix: str = "kafka") -> None:
        super().__init__()
        self.prefix = prefix
        self._throttle = _Throttle(every_s)
        self._lock = threading.Lock()

    def filter(self, record: logging.LogRecord) -> bool:
        if not record.name.startswith(self.prefix):
            return True
        key = f"{record.name}:{re.sub(r'[0-9]+', '#', record.getMessage())[:120]}"
        with self._lock:
            if not self._throttle.ready(key):
                return False
            held = self._throttle.take_suppressed(key)
        if held:
            record.msg = f"{record.getMessage()} ({held} similar lines held back)"
            record.args = None
        return True


def _partitions(tps: set[Any]) -> str:
    return ", ".join(f"{tp.topic}[{tp.partition}]" for tp in sorted(tps))


def _signature(path: Path) -> tuple[str, int, int] | None:
    """What changes when a bundle at `path` is replaced (also through a swapped symlink)."""
    try:
        manifest = Path(os.path.realpath(path)) / "manifest.json"
        st = manifest.stat()
    except OSError:
        return None
    return str(manifest), st.st_mtime_ns, st.st_size


def _json(record: Any) -> bytes:
    return record.model_dump_json().encode()


def _raw_key(key: str, encoding: str | None) -> bytes:
    return base64.b64decode(key) if encoding == "base64" else key.encode("utf-8")
