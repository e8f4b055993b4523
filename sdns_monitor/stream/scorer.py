"""The scorer thread of `run`: scores decoded batches in order and sends their records (scores,
alerts, incident closings, dead letters).

It owns the incident state and the generation under one lock. When the loop abandons the
batches in flight after a delivery failure (`abandon`), the generation moves on, so batches
still queued are skipped, and the incident state is rolled back to before the failed batch:
the retried batch sends the alerts the failed one could not.
"""

from __future__ import annotations

import logging
import queue
import threading
from collections.abc import Callable
from typing import Any

import numpy as np
from kafka.errors import KafkaError

from sdns_monitor.errors import FrameError, OutputError, ScoringUnavailable
from sdns_monitor.records import (
    ModelRef,
    ScoreRecord,
    to_json,
)
from sdns_monitor.sequential import camera_margin
from sdns_monitor.settings import RunSettings
from sdns_monitor.stream.alerting import Verdict, make_alerting
from sdns_monitor.stream.batch import Batch, Decoded, Frame
from sdns_monitor.stream.outputs import Outputs

log = logging.getLogger("sdns_monitor.stream")

IDLE_S = 0.5  # an idle scorer looks for quiet incidents and silent cameras this often
BREAKER_FRAMES = 3  # failed frames in a row, none scored between, that make a model fault


class Scorer:
    """Scores batches handed over by `submit` on its own thread (`start`), or one batch at a
    time with `process`."""

    def __init__(
        self,
        settings: RunSettings,
        on_delivered: Callable[[Batch], None],
        outputs_ok: Callable[[], bool] = lambda: True,
    ) -> None:
        self.settings = settings
        self.outputs = Outputs(settings.dlq_topic, settings.max_frame_bytes)
        self.alerting = make_alerting(settings, self.outputs)
        self.generation = 0  # read by the loop when it makes a batch; written under _lock
        self._on_delivered = on_delivered  # stats of a batch delivered by `process`
        self._outputs_ok = outputs_ok
        self._lock = threading.Lock()
        self._queue: queue.Queue[Batch | None] = queue.Queue()
        self._thread: threading.Thread | None = None
        self.died: BaseException | None = None  # what killed the scoring thread, if anything
        self.failing_frames = 0  # frames that failed to score since one last scored

    # ------------------------------------------------------------------ the thread
    def start(self, producer: Callable[[], Any]) -> None:
        """Score on a thread; `producer` gives the producer in use (it is renewed)."""
        self._thread = threading.Thread(
            target=self._run, args=(producer,), name="sdns-score", daemon=True
        )
        self._thread.start()

    def submit(self, batch: Batch) -> None:
        self._queue.put(batch)

    def close(self, timeout: float = 60) -> None:
        """Finish the batches queued, then stop."""
        self._queue.put(None)
        if self._thread is not None:
            self._thread.join(timeout)

    def alive(self) -> bool:
        """False once a started scoring thread has ended (died, or closed)."""
        return self._thread is None or self._thread.is_alive()

    def _run(self, producer: Callable[[], Any]) -> None:
        try:
            self._score_queued(producer)
        except BaseException as exc:  # the loop sees it and stops; /healthz fails meanwhile
            self.died = exc
            log.exception("the scorer thread died")

    def _score_queued(self, producer: Callable[[], Any]) -> None:
        while True:
            try:
                batch = self._queue.get(timeout=IDLE_S)
            except queue.Empty:
                if self.alerting.idle_work() and self._outputs_ok():
                    self._close_quiet_incidents(producer())
                continue
            if batch is None:
                return
            with self._lock:
                if batch.moves is not None:  # a rebalance: whatever the generation
                    self.alerting.move(batch.moves)
                elif batch.generation != self.generation:
                    batch.error = OutputError("abandoned after an earlier batch failed")
                else:
                    self.score_batch(batch, producer())
            batch.scored.set()

    def abandon(self, failed: Batch) -> None:
        """Skip the batches queued and roll the incident state back to before `failed`."""
        with self._lock:
            self.generation += 1
            if failed.snapshot is not None:
                self.alerting.restore(failed.snapshot)

    def settled(self, batch: Batch) -> None:
        """`batch` was delivered and committed in order: its undo log can go."""
        if batch.snapshot is not None:
            self.alerting.settled(batch.snapshot)

    # ------------------------------------------------------------------ one batch
    def process(self, batch: Batch, producer: Any) -> None:
        """Score one decoded batch synchronously and deliver every record it causes
        (acknowledged), or raise OutputError having changed nothing but the broker's topics."""
        with self._lock:
            generation = self.generation
            self.score_batch(batch, producer)
        producer.flush()
        batch.scored.set()
        if batch.delivered() is False and self.outputs.recover(batch, producer):
            producer.flush()  # the stand-ins of records refused for good
        if not batch.delivered():
            with self._lock:
                # Unless the loop abandoned the batches in flight meanwhile: it restored the
                # state from before all of them, which this batch's snapshot is not.
                if batch.snapshot is not None and self.generation == generation:
                    self.alerting.restore(batch.snapshot)
            if isinstance(batch.error, OutputError) or batch.error is None:
                raise OutputError(batch.failure())
            raise batch.error
        self._on_delivered(batch)

    def score_batch(self, batch: Batch, producer: Any) -> None:
        """Dead-letter the undecodable messages, score the frames, close quiet incidents; a
        failure is left in `batch.error` (an OutputError, or a bug that stops the loop)."""
        batch.snapshot = self.alerting.snapshot()
        try:
            assert batch.decoded is not None
            decoded = batch.decoded.result()
            for m in batch.messages:
                batch.messages_by_topic[m.topic] += 1
            for bad in decoded.undecodable:
                self.outputs.dead_letter(batch, producer, bad.message, bad.error, bad.source)
                batch.dead_letters[type(bad.error).__name__] += 1
            if decoded.frames:
                self._score(decoded.frames, batch, producer)
            self.alerting.tick(batch, producer)
        except KafkaError as exc:  # raised by send() itself: e.g. no metadata for a topic
            batch.error = OutputError(f"{type(exc).__name__}: {exc}")
        except ScoringUnavailable as exc:  # retried like an output failure
            batch.error = exc
        except BaseException as exc:  # a bug: surfaced by the loop, which stops
            batch.error = exc
            log.exception("scoring a batch failed")

    def _score(self, frames: list[Frame], batch: Batch, producer: Any) -> None:
        """Score the frames model by model; send their records in offset order."""
        s = self.settings
        verdicts: dict[int, Verdict] = {}
        for detector in {id(f.detector): f.detector for f in frames}.values():
            mine = [f for f in frames if f.detector is detector]
            try:
                scores = detector.anomaly_scores(np.concatenate([f.image for f in mine]))
            except Exception:
                mine, scores = self._score_one_by_one(mine, batch, producer)
                if not mine:
                    continue
            result = detector.result(scores, alarm_rate=s.alarm_rate, threshold=s.threshold)
            model = ModelRef(hash=detector.hash, name=detector.name)
            margin = camera_margin(s.camera_margin, detector.held_out_ratio)
            for i, frame in enumerate(mine):
                verdicts[id(frame)] = Verdict(
                    float(result.scores[i]),
                    float(result.p_values[i]),
                    bool(result.flags[i]),
                    result.alarm_rate,
                    result.threshold,
                    model,
                    margin,
                )
        scored = [(f, verdicts[id(f)]) for f in frames if id(f) in verdicts]  # offset order
        for frame, v in scored:
            topic = frame.source.topic
            batch.frames[topic] += 1
            batch.flagged[topic] += v.flagged
            if s.scores_topic:
                record = ScoreRecord(
                    source=frame.source,
                    score=v.score,
                    p_value=v.p_value,
                    flagged=v.flagged,
                    model=v.model,
                )
                self.outputs.send(
                    batch,
                    producer,
                    s.scores_topic,
                    key=frame.key,
                    value=to_json(record),
                    about=frame.source,
                )
        self.alerting.frames(batch, producer, scored)

    def _score_one_by_one(
        self, frames: list[Frame], batch: Batch, producer: Any
    ) -> tuple[list[Frame], np.ndarray]:
        """The batch could not be scored: score frame by frame and dead-letter the frames that
        fail, so that one frame never stops the stream. When every frame fails, and the
        frames before them did too (BREAKER_FRAMES in a row), the fault is the model's or its
        device's, not the frames': ScoringUnavailable, and the batch is retried instead."""
        kept, scores, failed = [], [], []
        for frame in frames:
            try:
                scores.append(frame.detector.anomaly_scores(frame.image)[0])
                kept.append(frame)
            except Exception as raised:
                failed.append((frame, raised))
        self.failing_frames = 0 if kept else self.failing_frames + len(failed)
        if not kept and self.failing_frames >= BREAKER_FRAMES:
            last = failed[-1][1]
            log.error(
                "scoring failed for %d frames in a row (%s: %s); not committing, retrying",
                self.failing_frames,
                type(last).__name__,
                last,
            )
            raise ScoringUnavailable(
                f"scoring failed for the last {self.failing_frames} frames "
                f"({type(last).__name__}: {' '.join(str(last).split())[:200]})"
            )
        for frame, why in failed:
            where = frame.source
            log.error(
                "scoring failed for %s[%d]@%d: %s: %s",
                where.topic,
                where.partition,
                where.offset,
                type(why).__name__,
                why,
            )
            error = FrameError(f"scoring failed: {type(why).__name__}: {why}")
            message = batch.message_at(frame.source)
            self.outputs.dead_letter(batch, producer, message, error, frame.source)
            batch.dead_letters["ScoringError"] += 1
        return kept, np.asarray(scores, dtype=np.float64)

    def _close_quiet_incidents(self, producer: Any) -> None:
        """On an idle stream: close quiet incidents (retried next time if their records are not
        delivered)."""
        try:
            self.process(Batch.decoded_already([], None, self.generation, Decoded()), producer)
        except OutputError as exc:
            log.error("%s; will try again", exc)
