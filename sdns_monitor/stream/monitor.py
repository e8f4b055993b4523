"""`StreamMonitor`: the consume -> decode -> score -> produce -> commit loop of `run`.

A pipeline of three kinds of thread, so that the encoder is not idle while Kafka I/O and
decoding happen; they hand batches over through a queue and futures, not shared fields:

    loop thread     poll a micro-batch -> decoder pool  ->  scorer thread
                    (intake, owns the      (batch.py:        (scorer.py: encoder, k-NN,
                     consumer)              decode, resize)   records, incidents)
                    commit, in order, the batches whose records were all acknowledged
                    (offsets.py)

At-least-once: a batch's offsets are committed only after every alert, score and dead-letter
record it caused has been acknowledged by the broker, and never past an earlier batch that is
still in flight. At most `queue_batches` batches are between consumer and commit; beyond that
the consumer pauses (backpressure) instead of buffering. When outputs cannot be delivered (a
broker outage, a topic refusing records), nothing more is committed: every batch in flight is
abandoned, the consumer seeks back to their first offsets and tries again after a backoff
(0.5 s doubling to 30 s), so memory stays bounded and nothing is lost. A frame that cannot be
decoded, or (rarely) scored, goes to the dead-letter topic with the reason; it never stops the
stream. Hot reload: reload.py; stats, metrics and probes: health.py.
"""

from __future__ import annotations

import concurrent.futures
import logging
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from sdns_monitor.detector import Detector
from sdns_monitor.errors import ScoringUnavailable, SdnsError
from sdns_monitor.records import Alert, CameraAlert
from sdns_monitor.scoring import cannot_flag
from sdns_monitor.sequential import camera_margin
from sdns_monitor.settings import RunSettings
from sdns_monitor.stream import kafka, memory
from sdns_monitor.stream.batch import Batch, Decoded, DecodeLimits, decode_messages
from sdns_monitor.stream.health import Status, StreamStats
from sdns_monitor.stream.intake import Intake
from sdns_monitor.stream.offsets import COMMIT_TIMEOUT_MS, HeadFailed, InFlight
from sdns_monitor.stream.prometheus import Metrics
from sdns_monitor.stream.reload import Reloader
from sdns_monitor.stream.routing import Models
from sdns_monitor.stream.scorer import Scorer
from sdns_monitor.stream.server import HealthServer

log = logging.getLogger("sdns_monitor.stream")

BACKOFF_S = (0.5, 30.0)  # first and longest wait between delivery retries
GAUGES_EVERY_S = 0.5  # how often readiness, lag and incident gauges are refreshed


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
        on_alert: Callable[[Alert | CameraAlert], None] | None = None,
    ) -> None:
        self.settings = settings
        reuse = None if detector is None else Models(detector)
        changed: set[Path] | None = None if detector is None else set()
        self.models = Models.load(settings.model, settings.routes, self._load, reuse, changed)
        self.limits = DecodeLimits.of(settings)
        self.inflight = InFlight(
            settings.queue_batches,
            settings.max_inflight_bytes,
            settings.max_inflight_frames,
            state_barrier=settings.state_topic is not None and settings.alerts == "cameras",
        )
        self._state_written = 0.0  # monotonic time of the last batch that writes state
        self.status = Status(self.inflight.joined, on_alert)
        self.status.metrics.set_models([(d.name, d.hash) for d in self.models.unique()])
        self.scorer = Scorer(settings, self.status.delivered, self.status.outputs_ok)
        self.status.workers["scorer"] = self.scorer.alive
        self.reloader = Reloader(settings, self._load)
        self.health: HealthServer | None = None
        self._producer: kafka.Producer | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._error: BaseException | None = None

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
            *(det.name, det.hash[:12], signed, det.score_mode, det.backend, det.device),
        )
        if s.alerts == "cameras":
            _log_margin(det, s.camera_margin)
        return det

    @property
    def detector(self) -> Detector:
        """The default model (for keys no route matches)."""
        return self.models.default

    @property
    def stats(self) -> StreamStats:
        return self.status.stats

    @property
    def metrics(self) -> Metrics:
        return self.status.metrics

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
        return self.inflight.joined.wait(timeout)

    def reload(self, path: str | Path | None = None, *, changed: set[Path] | None = None) -> None:
        """Load the bundles again (all of them, or those at the `changed` paths) and swap them
        in between batches; with `path`, the default model comes from there instead. Safe to
        call from a signal handler or another thread."""
        self.reloader.request(path, changed)

    def not_ready(self) -> str | None:
        """None when ready, else why not (what `/readyz` answers)."""
        return self.status.not_ready()

    def not_alive(self) -> str | None:
        """None while the loop comes round, else why not (what `/healthz` answers)."""
        return self.status.not_alive()

    def process(self, messages: list[Any], producer: Any) -> None:
        """Score one micro-batch synchronously and deliver every record it causes
        (acknowledged), or raise OutputError having changed nothing but the broker's topics.
        For embedding without a consumer; `run` pipelines the same steps."""
        decoded = decode_messages(messages, self.models, self.limits)
        batch = Batch.decoded_already(messages, self.models, self.scorer.generation, decoded)
        self.scorer.process(batch, producer)

    # ------------------------------------------------------------------ the loop
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
            consumer, producer = kafka.connect(s, lambda c: self.inflight.listener(c, s.group_id))
            self._producer = kafka.Producer(s, producer)
            self.scorer.start(lambda: self._producer.current if self._producer else None)
            try:
                with memory.upkeep():  # returns freed heap memory to the system (memory.py)
                    self._loop(consumer, decoders, stop, idle_exit_s)
            finally:
                self.scorer.close()  # finishes what it has, then stops
        finally:
            self.inflight.joined.clear()
            self.metrics.ready.set(0)
            decoders.shutdown(wait=False, cancel_futures=True)
            if self._producer is not None:
                self._producer.close(timeout=10)
            if consumer is not None:
                # Leaves the group, so partitions move on at once (bounded: the broker may be down).
                consumer.close(timeout_ms=COMMIT_TIMEOUT_MS)
            if self.health is not None:
                self.health.stop()
            self.reloader.close()
        return self.stats

    def _loop(
        self,
        consumer: Any,
        decoders: concurrent.futures.Executor,
        stop: threading.Event,
        idle_exit_s: float | None,
    ) -> None:
        """Consume and hand micro-batches to the decoders and the scorer; commit, in order,
        what was delivered."""
        intake = Intake(consumer, self.settings.batch_size, self.settings.max_wait_ms)
        watch = kafka.ConnectionWatch(self.settings.session_timeout_ms)
        backoff, last_data, next_gauges = BACKOFF_S[0], time.monotonic(), 0.0
        while not stop.is_set():
            self.status.last_loop = now = time.monotonic()
            if self.scorer.died is not None:  # a bug: stop, so that a supervisor restarts us
                raise SdnsError(f"the scorer thread died: {self.scorer.died!r}")
            if now >= next_gauges:  # on every path of the loop, backpressure and retries too
                self._gauges(consumer, watch, intake)
                next_gauges = now + GAUGES_EVERY_S
            self._swap_models()
            if not self._settle(consumer):  # the head batch was not delivered
                self._retry_later(consumer, backoff, stop)
                backoff = min(backoff * 2, BACKOFF_S[1])
                continue
            if self.inflight.full():  # backpressure
                stray = intake.hold()
                self._follow_rebalances()
                self._submit(stray, decoders)
                self.inflight.wait_head(0.05)
                continue
            messages = intake.collect(stop, busy=len(self.inflight) > 0)
            self._follow_rebalances()  # before the new partitions' frames are scored
            if messages:
                last_data = time.monotonic()
                backoff = BACKOFF_S[0] if self.status.outputs_ok() else backoff
                self._submit(messages, decoders)
            elif self._state_due(idle=True):
                self._submit_job(writes_state=True)  # idle: write the state, commit the rest
            elif not self.inflight.joined.is_set() or len(self.inflight):
                last_data = time.monotonic()  # idle time counts once in the group, empty
            elif idle_exit_s is not None and time.monotonic() - last_data > idle_exit_s:
                break
        self._drain(consumer)

    def _submit(self, messages: list[Any], decoders: concurrent.futures.Executor) -> None:
        """Send a micro-batch down the pipeline (decoders, then the scorer)."""
        if not messages:
            return
        batch = Batch(messages, self.models, self.scorer.generation)
        batch.writes_state = self._state_due()
        batch.decoded = decoders.submit(decode_messages, messages, self.models, self.limits)
        self.inflight.add(batch)
        self.scorer.submit(batch)

    def _state_due(self, idle: bool = False) -> bool:
        """Whether the next batch writes the camera state (every `state_flush_s`); `idle`: an
        empty one, for batches staged on a stream that went quiet."""
        if self.inflight.state_barrier is False:
            return not idle
        if idle and (len(self.inflight) or not self.inflight.staged()):
            return False
        now = time.monotonic()
        if now - self._state_written < self.settings.state_flush_s:
            return False
        self._state_written = now
        return True

    def _submit_job(
        self, moves: list[tuple[str, set[Any]]] | None = None, writes_state: bool = False
    ) -> None:
        """A batch without messages, in order with the others: a rebalance to follow, or the
        camera state to write."""
        job = Batch.decoded_already([], self.models, self.scorer.generation, Decoded())
        job.moves, job.writes_state = moves, writes_state
        self.inflight.add(job)
        self.scorer.submit(job)

    def _follow_rebalances(self) -> None:
        """Hand partitions assigned or revoked since the last call to the scorer, in order
        with the batches: camera state follows its partitions (state.py)."""
        moves = self.inflight.take_moves()
        if moves:
            self._submit_job(moves=moves)

    def _settle(self, consumer: Any) -> bool:
        """Count and commit the delivered batches at the head of the pipeline, in order.
        False when the head batch was not delivered."""
        try:
            done = self.inflight.settle(self._recover)
        except HeadFailed:
            return False
        for batch in done:
            self.status.delivered(batch)
            self.scorer.settled(batch)
        if done:
            self.status.outputs_recovered()
        if (done or self.inflight.commit_due()) and self.inflight.pending():
            self.inflight.commit(consumer)
        return True

    def _recover(self, batch: Batch) -> bool:
        """Send stand-ins for the records of `batch` the broker refused for good."""
        producer = self._producer.current if self._producer is not None else None
        return producer is not None and self.scorer.outputs.recover(batch, producer)

    def _retry_later(self, consumer: Any, backoff: float, stop: threading.Event) -> None:
        """The head batch was not delivered: abandon every batch in flight, roll the incident
        state back to before them, seek back to their first offsets and wait. They are
        consumed and scored again; nothing after them was committed."""
        head = self.inflight.head
        problem = head.failure()
        self.scorer.abandon(head)
        assert self._producer is not None
        self._producer.renew()
        self.inflight.abandon(consumer)
        self.status.output_failed(problem, scoring=isinstance(head.error, ScoringUnavailable))
        log.error("%s; offsets not committed, retrying in %.1f s", problem, backoff)
        stop.wait(backoff)

    def _drain(self, consumer: Any, timeout: float = 60.0) -> None:
        """On stop: let the batches in flight finish, then commit them."""
        deadline = time.monotonic() + timeout
        if self.inflight.staged() or (len(self.inflight) and self.inflight.state_barrier):
            self._submit_job(writes_state=True)  # so that what was scored can be committed
        if self._producer is not None:
            self._producer.current.flush(timeout=max(deadline - time.monotonic(), 0))
        while len(self.inflight) and time.monotonic() < deadline:
            if not self._settle(consumer):
                log.warning("stopping with undelivered outputs; their frames were not committed")
                return
            self.inflight.wait_head(0.05)

    def _gauges(self, consumer: Any, watch: kafka.ConnectionWatch, intake: Intake) -> None:
        lag = kafka.consumer_lag(consumer)
        behind = sum(lag.values())
        self.status.starved(intake.starved_s(behind), behind)
        self.status.gauges(
            lag,
            watch.problem(consumer),
            self.scorer.alerting.open_count,
            self.inflight.assigned,
            time.monotonic() - self.inflight.head.started if len(self.inflight) else 0.0,
            self.scorer.alerting.cameras,
            self.scorer.alerting.clamped,
        )

    def _swap_models(self) -> None:
        """Between batches: swap in the models of a finished reload."""
        new = self.reloader.poll(self.models)
        if new is None:
            return
        if isinstance(new, Exception):
            self.status.reloaded(ok=False)
            log.error("reload failed, keeping the models in use: %s", new)
            return
        old, self.models = self.models, new
        self.metrics.set_models([(d.name, d.hash) for d in new.unique()])
        self.status.reloaded(ok=True)
        before = {d.hash for d in old.unique()}
        for det in new.unique():
            if det.hash not in before:
                log.info("model reloaded: %s %s", det.name, det.hash[:12])


def _log_margin(det: Detector, configured: float | None) -> None:
    """Which margin the camera test uses for `det`, and a warning when a configured one is
    below what the bundle's held-out reference images showed."""
    ratio = det.held_out_ratio
    margin = camera_margin(configured, ratio)
    seen = "no held-out check in the bundle" if ratio is None else f"held-out ratio {ratio:.2f}"
    log.info("model %s: camera margin %.2f (%s)", det.name, margin, seen)
    if ratio is not None and margin < ratio:
        log.warning(
            "model %s: camera_margin %.2f is below the %.2f times the alarm rate its held-out "
            "reference images were flagged at; healthy cameras may alarm more often than "
            "camera_ert_frames says: raise camera_margin or leave it unset",
            det.name,
            margin,
            ratio,
        )
