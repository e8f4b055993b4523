"""What `run` has done and whether it is well: counters (`StreamStats`), Prometheus metrics of
delivered batches, liveness (`/healthz`) and readiness (`/readyz`).

Counters, metrics and `on_alert` callbacks see a batch only once it was delivered, so a retried
batch is not counted twice. The loop thread and, for incident closings on an idle stream, the
scorer thread report batches; the HTTP server's threads read the problems.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import Counter as Tally
from collections.abc import Callable
from dataclasses import dataclass, field

from sdns_monitor.records import Alert, CameraAlert
from sdns_monitor.stream.batch import Batch
from sdns_monitor.stream.prometheus import Metrics

log = logging.getLogger("sdns_monitor.stream")

STALL_S = 300.0  # /healthz fails when the loop has not come round for this long
HEAD_STALL_S = 120.0  # /readyz fails while the oldest batch in flight is older than this
STARVED_S = 120.0  # /readyz fails while the consumer is behind and has fetched nothing this long


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


class Status:
    """Stats, metrics and the problems that make `/readyz` and `/healthz` fail."""

    def __init__(
        self,
        joined: threading.Event,
        on_alert: Callable[[Alert | CameraAlert], None] | None = None,
    ) -> None:
        self.stats = StreamStats()
        self.metrics = Metrics()
        self.joined = joined  # set by the rebalance listener (offsets.InFlight)
        self.on_alert = on_alert
        self.last_loop = time.monotonic()
        self.output_problem: str | None = None  # outputs not delivered: retrying
        self.broker_problem: str | None = None  # cut off from the brokers
        self.stall_problem: str | None = None  # the oldest batch in flight is not moving
        self.starved_problem: str | None = None  # behind, and no record fetched for a while
        self._clamped: Tally[str] = Tally()  # clamped timestamps counted so far, by direction
        self.workers: dict[str, Callable[[], bool]] = {}  # name -> is that thread alive
        self._lock = threading.Lock()

    # ------------------------------------------------------------------ probes
    def not_ready(self) -> str | None:
        """None when ready, else why not (what `/readyz` answers)."""
        if not self.joined.is_set():
            return "not ready: the consumer has not joined its group yet"
        if self.output_problem is not None:
            return f"not ready: {self.output_problem}"
        if self.broker_problem is not None:
            return f"not ready: {self.broker_problem}"
        if self.stall_problem is not None:
            return f"not ready: {self.stall_problem}"
        if self.starved_problem is not None:
            return f"not ready: {self.starved_problem}"
        return None

    def not_alive(self) -> str | None:
        dead = [name for name, alive in self.workers.items() if not alive()]
        if dead:
            return f"not alive: the {', '.join(dead)} thread died"
        stalled = time.monotonic() - self.last_loop
        if stalled > STALL_S:
            return f"not alive: the loop has not come round for {stalled:.0f} s"
        return None

    def outputs_ok(self) -> bool:
        return self.output_problem is None

    # ------------------------------------------------------------------ what happened
    def output_failed(self, problem: str, scoring: bool = False) -> None:
        """A batch was not delivered (or, `scoring`, the model failed on all of it): it is
        retried, and nothing is committed meanwhile."""
        self.stats.output_failures += 1
        self.metrics.output_failures.inc()
        self.output_problem = problem if scoring else f"outputs not delivered ({problem})"
        self.metrics.ready.set(0)

    def outputs_recovered(self) -> None:
        if self.output_problem is not None:
            log.info("outputs delivered again; resuming")
            self.output_problem = None

    def starved(self, starved_s: float, behind: int) -> None:
        """The consumer has fetched nothing for `starved_s` while `behind` messages wait."""
        problem = None
        if starved_s > STARVED_S:
            problem = (
                f"{behind} messages are waiting and none was fetched for {starved_s:.0f} s "
                "(the broker is not serving fetches)"
            )
        if problem is not None and self.starved_problem is None:
            log.error("%s; not ready", problem)
        elif problem is None and self.starved_problem is not None:
            log.info("records arrive again")
        self.starved_problem = problem

    def gauges(
        self,
        lag: Tally[str],
        broker_problem: str | None,
        incidents_open: int,
        assigned: int,
        head_age_s: float,
        cameras: int = 0,
        clamped: Tally[str] | None = None,
    ) -> None:
        self.broker_problem = broker_problem
        stalled = head_age_s > HEAD_STALL_S
        if stalled and self.stall_problem is None:
            log.error("the oldest batch in flight has waited %.0f s; not ready", head_age_s)
        elif not stalled and self.stall_problem is not None:
            log.info("the pipeline moves again")
        self.stall_problem = (
            f"the oldest batch in flight has waited {head_age_s:.0f} s" if stalled else None
        )
        # Only the topics this member owns now: a stale figure for a topic whose partitions
        # moved to another member would be summed twice by an autoscaler.
        self.metrics.consumer_lag.clear()
        for topic, value in lag.items():
            self.metrics.consumer_lag.labels(topic=topic).set(value)
        self.metrics.incidents_open.set(incidents_open)
        self.metrics.cameras.set(cameras)
        for direction in ("future", "past"):  # the scorer's running tallies, as increments
            total = (clamped or Tally()).get(direction, 0)  # one get: safe beside the scorer
            if total > self._clamped[direction]:
                self.metrics.clamped_timestamps.labels(direction=direction).inc(
                    total - self._clamped[direction]
                )
                self._clamped[direction] = total
        self.metrics.assigned_partitions.set(assigned)
        self.metrics.ready.set(0 if self.not_ready() else 1)

    def reloaded(self, ok: bool) -> None:
        self.metrics.reloads.labels(result="ok" if ok else "failed").inc()
        if ok:
            self.stats.reloads += 1
        else:
            self.stats.reload_failures += 1

    def delivered(self, batch: Batch) -> None:
        """Count a batch whose records were all acknowledged, and tell `on_alert` of its alerts."""
        with self._lock:
            self._count(batch)
        if self.on_alert is not None:
            for alert in batch.alerts:
                try:
                    self.on_alert(alert)
                except Exception:  # a callback's bug must not stop the stream
                    log.exception("on_alert callback failed")

    def _count(self, batch: Batch) -> None:
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
            m.batch_latency.observe(time.monotonic() - batch.started)
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
        for topic, n in batch.refused.items():
            m.refused.labels(topic=topic).inc(n)
        m.scored(sum(batch.frames.values()))
