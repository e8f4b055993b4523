"""What turns scored frames into alerts, by `--alerts`: camera alarms (the default) or frame
incidents. Both are the scorer thread's, and undo a failed batch's changes the same way
(`snapshot` before a batch, `restore` to it)."""

from __future__ import annotations

import time
from collections import Counter as Tally
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np

from sdns_monitor.records import Alert, CameraAlert, ModelRef, decode_key, to_json
from sdns_monitor.sequential import DEFAULT_MARGIN, evidence, threshold
from sdns_monitor.settings import RunSettings
from sdns_monitor.stream import state
from sdns_monitor.stream.batch import Batch, Frame
from sdns_monitor.stream.cameras import CameraAlarms
from sdns_monitor.stream.incidents import IncidentTracker
from sdns_monitor.stream.outputs import Outputs


@dataclass(frozen=True)
class Verdict:
    """A scored frame."""

    score: float
    p_value: float
    flagged: bool
    alarm_rate: float | None
    threshold: float | None
    model: ModelRef
    margin: float = DEFAULT_MARGIN  # the camera test's, for this model (sequential.py)


class Alerting(Protocol):
    @property
    def open_count(self) -> int: ...

    @property
    def cameras(self) -> int:
        """Keys whose state is kept (camera alarms; 0 for frame incidents)."""

    @property
    def clamped(self) -> Tally[str]:
        """Timestamps clamped so far, by "future" / "past" (read from the loop's thread)."""

    def snapshot(self) -> Any: ...

    def restore(self, snapshot: Any) -> None: ...

    def settled(self, snapshot: Any) -> None:
        """The batch of `snapshot` and those before it were delivered (the loop's thread)."""

    def frames(self, batch: Batch, producer: Any, scored: list[tuple[Frame, Verdict]]) -> None:
        """Send the alerts the frames of a batch (in offset order) cause."""

    def tick(self, batch: Batch, producer: Any) -> None:
        """Send what time alone causes (closings, silences, expired cameras' state)."""

    def idle_work(self) -> bool:
        """Whether `tick` may have something to send on an idle stream."""

    def move(self, moves: list[tuple[str, set[Any]]]) -> None:
        """Follow a rebalance (partitions assigned and revoked, in order)."""


class CameraAlerts:
    """`--alerts cameras`: a sequential test per camera (stream/cameras.py)."""

    def __init__(self, settings: RunSettings, outputs: Outputs) -> None:
        self.settings = settings
        self.outputs = outputs
        self.alarms = CameraAlarms(
            threshold(settings.camera_ert_frames),
            settings.incident_cooldown_s,
            settings.silent_after_s,
            settings.camera_expiry_s,
            settings.max_clock_skew_s,
            settings.event_time,
        )
        self.unwritable: set[int] = set()  # input partitions the state topic lacks

    @property
    def open_count(self) -> int:
        return self.alarms.open_count

    @property
    def cameras(self) -> int:
        return len(self.alarms)

    @property
    def clamped(self) -> Tally[str]:
        return self.alarms.clamped

    def snapshot(self) -> Any:
        return self.alarms.snapshot()

    def restore(self, snapshot: Any) -> None:
        self.alarms.restore(snapshot)

    def settled(self, snapshot: Any) -> None:
        self.alarms.settled(snapshot)

    def frames(self, batch: Batch, producer: Any, scored: list[tuple[Frame, Verdict]]) -> None:
        if not scored:
            return
        p = np.array([v.p_value for _, v in scored])
        e = evidence(p, np.array([v.margin for _, v in scored]))
        now_s, now_ms = time.monotonic(), int(time.time() * 1000)
        for (frame, verdict), frame_evidence in zip(scored, e, strict=True):
            event = self.alarms.observe(frame.source, float(frame_evidence), now_s)
            if event is None:
                continue
            if event.cleared is not None:
                batch.closed_ids.append(f"camera {event.cleared.alarm_id} cleared")
                batch.incidents_closed += 1
                record: Any = event.cleared
            else:
                assert event.alarm is not None
                record = CameraAlert(
                    source=frame.source,
                    score=verdict.score,
                    p_value=verdict.p_value,
                    model=verdict.model,
                    detected_at_ms=now_ms,
                    reminder=event.kind == "reminder",
                    alarm=event.alarm,
                )
                batch.alerts.append(record)
            topic = self.settings.alert_topic
            self.outputs.send(
                batch, producer, topic, key=frame.key, value=to_json(record), about=frame.source
            )

    def _write_state(self, batch: Batch, producer: Any) -> None:
        """The state of the cameras this batch changed (frames, silences, expiry), to the state
        topic (state.py); an expired camera's is a tombstone."""
        topic = self.settings.state_topic
        if topic is None:
            self.alarms.take_dirty(export=False)
            return
        if not batch.writes_state:
            return  # kept dirty for the next batch that writes
        changed = self.alarms.take_dirty()
        for (input_topic, key), partition, camera in changed:
            if partition in self.unwritable:
                continue  # the state topic has no such partition (logged at the restore)
            self.outputs.send(
                batch,
                producer,
                topic,
                key=state.state_key(input_topic, key),
                value=None if camera is None else state.encode(camera),
                partition=partition,
            )

    def move(self, moves: list[tuple[str, set[Any]]]) -> None:
        """Follow a rebalance: restore the cameras of assigned partitions from the state topic,
        forget those of revoked ones."""
        for kind, partitions in moves:
            tps = {(tp[0], tp[1]) for tp in partitions}
            if kind == "revoked":
                self.alarms.drop_partitions(tps)
            elif self.settings.state_topic is not None:
                cameras, missing = state.restore(self.settings, tps)
                for camera in cameras:
                    self.alarms.install(camera)
                self.unwritable |= missing

    def tick(self, batch: Batch, producer: Any) -> None:
        for silent in self.alarms.silences():
            batch.silences += 1
            key = None if silent.key is None else decode_key(silent.key, silent.key_encoding)
            topic = self.settings.alert_topic
            about = silent.last_frame
            self.outputs.send(batch, producer, topic, key=key, value=to_json(silent), about=about)
        self._write_state(batch, producer)

    def idle_work(self) -> bool:
        return len(self.alarms) > 0  # silences and expiry run on the monitor's clock


class FrameIncidents:
    """`--alerts frames`: an incident per key from any flagged frame (stream/incidents.py)."""

    def __init__(self, settings: RunSettings, outputs: Outputs) -> None:
        self.settings = settings
        self.outputs = outputs
        self.incidents = IncidentTracker(settings.incident_window_s, settings.incident_cooldown_s)

    @property
    def open_count(self) -> int:
        return self.incidents.open_count

    @property
    def cameras(self) -> int:
        return 0  # frame incidents keep no camera state

    @property
    def clamped(self) -> Tally[str]:
        return Tally()  # nor event time

    def snapshot(self) -> Any:
        return self.incidents.snapshot()

    def restore(self, snapshot: Any) -> None:
        self.incidents.restore(snapshot)

    def settled(self, snapshot: Any) -> None:
        """Frame incidents snapshot by copying: nothing is kept to let go of."""

    def frames(self, batch: Batch, producer: Any, scored: list[tuple[Frame, Verdict]]) -> None:
        now_ms = int(time.time() * 1000)
        for frame, v in scored:
            if not v.flagged:
                continue
            incident, send = self.incidents.flagged(
                frame.source.key, frame.source.key_encoding, now_ms
            )
            if not send:
                continue
            alert = Alert(
                source=frame.source,
                score=v.score,
                p_value=v.p_value,
                alarm_rate=v.alarm_rate,
                threshold=v.threshold,
                model=v.model,
                detected_at_ms=now_ms,
                incident=incident,
            )
            batch.alerts.append(alert)
            topic = self.settings.alert_topic
            self.outputs.send(
                batch, producer, topic, key=frame.key, value=to_json(alert), about=frame.source
            )

    def tick(self, batch: Batch, producer: Any) -> None:
        """Send a closing record for every incident whose key has been quiet for a window."""
        for closed in self.incidents.expire(int(time.time() * 1000)):
            batch.incidents_closed += 1
            batch.closed_ids.append(f"{closed.incident_id} ({closed.frames} flagged frames)")
            key = None if closed.key is None else decode_key(closed.key, closed.key_encoding)
            topic = self.settings.alert_topic
            self.outputs.send(batch, producer, topic, key=key, value=to_json(closed))

    def idle_work(self) -> bool:
        return self.incidents.open_count > 0

    def move(self, moves: list[tuple[str, set[Any]]]) -> None:
        """Frame incidents live in memory: a rebalance leaves them as they are."""


def make_alerting(settings: RunSettings, outputs: Outputs) -> CameraAlerts | FrameIncidents:
    if settings.alerts == "frames":
        return FrameIncidents(settings, outputs)
    return CameraAlerts(settings, outputs)
