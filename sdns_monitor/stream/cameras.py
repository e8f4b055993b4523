"""Camera alarms: per key (camera), the sequential test over its frames' p-values
(sdns_monitor.sequential), its alarm, and its silence.

- A camera's alarm opens on the frame whose evidence crosses the threshold: one alert, with the
  estimated first frame of the change (where the statistic last left zero); while it is open,
  a reminder per cooldown of event time; when the camera's p-values look healthy again, a
  `camera-cleared` record. Its id is built from the key and the opening frame's partition and
  offset, so a replay or a restart that scores the same frames names the same alarm.
- Time is event time (the message timestamp, clamped to `max_clock_skew` of the monitor's
  clock and of the camera's latest): a replayed backlog alerts as the live stream did.
- A camera that sent frames and then none for `silent_after_s` of the monitor's own clock gets
  one `camera-silent` record (event time does not move for a dead camera).

Per-frame work is O(1) whatever the number of cameras: cameras are kept in order of the last
frame seen (silence and expiry look at the oldest only), and a batch's changes are undone from
a log of the cameras it touched (`snapshot`/`restore`), not from a copy of every camera.
"""

from __future__ import annotations

import collections
import copy
import hashlib
import time
from collections import Counter as Tally
from dataclasses import dataclass, field
from typing import Any, Literal

from sdns_monitor.records import AlarmRef, CameraCleared, CameraSilent, Source
from sdns_monitor.sequential import Cusum

UNDO_DEPTH = 256  # batch logs kept at most: more than can be in flight (queue_batches <= 64)


def alarm_id(key: str | None, partition: int, offset: int) -> str:
    """`DIGEST@PARTITION:OFFSET` of the frame that opened the alarm."""
    digest = hashlib.sha256(b"\x00" if key is None else key.encode("utf-8")).hexdigest()
    return f"{digest[:16]}@{partition}:{offset}"


@dataclass
class _Alarm:
    id: str
    opened_at_ms: int
    first_frame: Source
    last_alert_ms: int
    frames: int = 1
    alerts: int = 1


Ident = tuple[str, str | None]  # (input topic, key): a camera


@dataclass
class _Log:
    """What one batch changed, to undo it: each touched camera as it was before (None: new),
    and the cameras whose state it wrote to the state topic."""

    seq: int
    before: dict[Ident, _Camera | None] = field(default_factory=dict)
    written: set[Ident] = field(default_factory=set)


@dataclass
class _Camera:
    key: str | None
    key_encoding: Any
    cusum: Cusum
    event_ms: int = 0
    last_frame: Source | None = None
    change_start: Source | None = None  # the frame where the statistic last left zero
    alarm: _Alarm | None = None
    seen_s: float = 0.0  # the monitor's clock (monotonic) at its last frame
    partition: int = -1  # where its frames come from, and the last offset counted
    offset: int = -1

    def copy(self) -> _Camera:
        """For the undo log (once per camera a batch touches): shallow copies, which
        `dataclasses.replace` makes four times slower."""
        camera = copy.copy(self)
        camera.cusum = copy.copy(self.cusum)
        if self.alarm is not None:
            camera.alarm = copy.copy(self.alarm)
        return camera


@dataclass(frozen=True)
class Event:
    """What a frame did to its camera: opened its alarm, is a reminder, or cleared it."""

    kind: Literal["opened", "reminder", "cleared"]
    alarm: AlarmRef | None = None
    cleared: CameraCleared | None = None


class CameraAlarms:
    """The cameras of one monitor (the scorer thread's; not thread-safe)."""

    def __init__(
        self,
        h: float,
        cooldown_s: float,
        silent_after_s: float,
        expiry_s: float,
        max_skew_s: float,
        event_time: str = "message",
    ) -> None:
        self.h = h
        self.cooldown_ms = int(cooldown_s * 1000)
        self.silent_after_s = silent_after_s
        self.expiry_s = expiry_s
        self.max_skew_ms = int(max_skew_s * 1000)
        self.event_time = event_time
        self._active: collections.OrderedDict[Ident, _Camera] = collections.OrderedDict()
        self._silent: collections.OrderedDict[Ident, _Camera] = collections.OrderedDict()
        self._logs: collections.deque[_Log] = collections.deque(maxlen=UNDO_DEPTH)
        self._seq = 0
        self._settled = 0  # batches up to this one were delivered: their logs are not needed
        self._alarmed: set[Ident] = set()  # cameras whose alarm is open
        self.dirty: set[Ident] = set()  # cameras changed since `take_dirty` (for the state topic)
        self._expired: dict[Ident, int] = {}  # forgotten since `take_dirty`: their partitions
        self.clamped: Tally[str] = Tally()  # timestamps clamped, by "future" / "past"

    @property
    def open_count(self) -> int:
        """Cameras whose alarm is open."""
        return len(self._alarmed)

    def __len__(self) -> int:
        return len(self._active) + len(self._silent)

    # ------------------------------------------------------------------ undo per batch
    def snapshot(self) -> int:
        """Start a batch: its changes can be undone with `restore` of what this returns."""
        while self._logs and self._logs[0].seq <= self._settled:
            self._logs.popleft()
        self._seq += 1
        self._logs.append(_Log(self._seq))
        return self._seq

    def settled(self, seq: int) -> None:
        """The batch `snapshot` numbered `seq`, and every one before it, were delivered: their
        logs go at the next `snapshot`. Called from the loop's thread (one int written)."""
        self._settled = max(self._settled, seq)

    def restore(self, seq: int) -> None:
        """Undo every batch since (and including) the one `snapshot` numbered `seq`."""
        while self._logs and self._logs[-1].seq >= seq:
            log = self._logs.pop()
            # Their state is to be written again: what the undone batch wrote (it may have
            # reached the topic, or not), and the cameras it wrote for batches before it.
            self.dirty.update(log.before, log.written)
            for key, before in log.before.items():
                self._active.pop(key, None)
                self._silent.pop(key, None)
                self._alarmed.discard(key)
                if before is not None:
                    self._active[key] = before
                    if before.alarm is not None:
                        self._alarmed.add(key)

    def _touch(self, key: Ident) -> _Camera | None:
        """The camera `key` for changing (logged for undo), None if there is none."""
        camera = self._active.get(key) or self._silent.get(key)
        if self._logs:
            log = self._logs[-1].before
            if key not in log:
                log[key] = None if camera is None else camera.copy()
        self.dirty.add(key)
        return camera

    # ------------------------------------------------------------------ frames
    def observe(
        self, source: Source, p_evidence: float, now_s: float | None = None
    ) -> Event | None:
        """Count one scored frame of `source.key` with evidence e(p); what it did, if anything.
        Frames of one camera must come in offset order (they do: one partition each)."""
        now_s = time.monotonic() if now_s is None else now_s
        key = (source.topic, source.key)
        camera = self._touch(key)
        if camera is None:
            camera = _Camera(source.key, source.key_encoding, Cusum(self.h))
        self._silent.pop(key, None)
        self._active.pop(key, None)
        self._active[key] = camera  # the newest last
        camera.seen_s = now_s
        if source.partition == camera.partition and source.offset <= camera.offset:
            return None  # counted already, before a restart or a rebalance: never twice
        camera.partition, camera.offset = source.partition, source.offset
        camera.last_frame = source
        camera.event_ms = self._event_ms(camera, source.timestamp_ms)
        was_zero = camera.cusum.s <= 0.0
        opened = camera.cusum.step(p_evidence)
        if was_zero and camera.cusum.s > 0.0:
            camera.change_start = source
        if opened:
            start = camera.change_start or source
            camera.alarm = _Alarm(
                alarm_id(source.key, source.partition, source.offset),
                camera.event_ms,
                start,
                camera.event_ms,
            )
            self._alarmed.add(key)
            return Event("opened", self._ref(camera))
        alarm = camera.alarm
        if alarm is None:
            return None
        alarm.frames += 1
        if camera.cusum.cleared():
            camera.alarm = None
            self._alarmed.discard(key)
            cleared = CameraCleared(
                key=source.key,
                key_encoding=camera.key_encoding,
                alarm_id=alarm.id,
                opened_at_ms=alarm.opened_at_ms,
                cleared_at_ms=camera.event_ms,
                source=source,
                frames=alarm.frames,
                alerts=alarm.alerts,
            )
            return Event("cleared", cleared=cleared)
        if camera.event_ms - alarm.last_alert_ms >= self.cooldown_ms:
            alarm.alerts += 1
            alarm.last_alert_ms = camera.event_ms
            return Event("reminder", self._ref(camera))
        return None

    def _event_ms(self, camera: _Camera, timestamp_ms: int | None) -> int:
        """The frame's event time: its timestamp, or the arrival time; never further ahead of
        the monitor's clock than the skew bound, nor behind the camera's latest."""
        wall_ms = int(time.time() * 1000)
        if self.event_time == "arrival" or timestamp_ms is None or timestamp_ms < 0:
            at = wall_ms
        elif timestamp_ms > wall_ms + self.max_skew_ms:
            self.clamped["future"] += 1
            at = wall_ms
        else:
            at = timestamp_ms
        if camera.last_frame is not None and at < camera.event_ms:
            if camera.event_ms - at > self.max_skew_ms:
                self.clamped["past"] += 1
            at = camera.event_ms  # event time never goes back for one camera
        return at

    def _ref(self, camera: _Camera) -> AlarmRef:
        alarm = camera.alarm
        assert alarm is not None
        return AlarmRef(
            id=alarm.id,
            opened_at_ms=alarm.opened_at_ms,
            first_frame=alarm.first_frame,
            evidence=camera.cusum.s,
            threshold=self.h,
            frames=alarm.frames,
            alerts=alarm.alerts,
        )

    # ------------------------------------------------------------------ the monitor's clock
    def silences(self, now_s: float | None = None) -> list[CameraSilent]:
        """Cameras that went silent since the last call (one record each per silence), and
        the state of cameras not seen for `expiry_s` dropped."""
        now_s = time.monotonic() if now_s is None else now_s
        out: list[CameraSilent] = []
        while self.silent_after_s > 0 and self._active:
            key, camera = next(iter(self._active.items()))
            if now_s - camera.seen_s < self.silent_after_s:
                break
            self._touch(key)
            del self._active[key]
            self._silent[key] = camera
            assert camera.last_frame is not None
            out.append(
                CameraSilent(
                    key=camera.key,
                    key_encoding=camera.key_encoding,
                    last_frame=camera.last_frame,
                    silent_s=round(now_s - camera.seen_s, 3),
                    detected_at_ms=int(time.time() * 1000),
                )
            )
        for cameras in (self._silent, self._active):
            while cameras:
                key, camera = next(iter(cameras.items()))
                if now_s - camera.seen_s < self.expiry_s:
                    break
                self._touch(key)
                del cameras[key]
                self._alarmed.discard(key)
                self._expired[key] = camera.partition
        return out

    # ------------------------------------------------------------------ the state topic
    def take_dirty(self, export: bool = True) -> list[tuple[Ident, int, dict[str, Any] | None]]:
        """The cameras changed since the last call: (camera, partition of its frames, state to
        write), the state None for a camera that expired (a tombstone: compaction drops it).
        `export=False` only forgets them (no state topic)."""
        out: list[tuple[Ident, int, dict[str, Any] | None]] = []
        for key in sorted(self.dirty, key=repr) if export else ():
            state = self.export(key)
            if state is not None:
                out.append((key, state["partition"], state))
            elif key in self._expired:  # not brought back by an undo since
                out.append((key, self._expired[key], None))
        if self._logs:
            self._logs[-1].written.update(self.dirty)
        self.dirty.clear()
        self._expired.clear()
        return out

    def export(self, key: Ident) -> dict[str, Any] | None:
        """A camera's state as plain data (None when it has none)."""
        camera = self._active.get(key) or self._silent.get(key)
        if camera is None:
            return None
        alarm = camera.alarm
        return {
            "topic": key[0],
            "key": camera.key,
            "key_encoding": camera.key_encoding,
            "partition": camera.partition,
            "offset": camera.offset,
            "s": camera.cusum.s,
            "event_ms": camera.event_ms,
            "silent": key in self._silent,  # its silence was reported: not again after a restart
            "last_frame": None if camera.last_frame is None else camera.last_frame.model_dump(),
            "change_start": (
                None if camera.change_start is None else camera.change_start.model_dump()
            ),
            "alarm": None
            if alarm is None
            else {
                "id": alarm.id,
                "opened_at_ms": alarm.opened_at_ms,
                "first_frame": alarm.first_frame.model_dump(),
                "last_alert_ms": alarm.last_alert_ms,
                "frames": alarm.frames,
                "alerts": alarm.alerts,
            },
        }

    def install(self, state: dict[str, Any], now_s: float | None = None) -> None:
        """A camera's state from the state topic (restored on assignment)."""
        now_s = time.monotonic() if now_s is None else now_s
        key: Ident = (state["topic"], state["key"])
        a = state.get("alarm")
        alarm = None
        if a is not None:
            alarm = _Alarm(
                a["id"],
                a["opened_at_ms"],
                Source.model_validate(a["first_frame"]),
                a["last_alert_ms"],
                a["frames"],
                a["alerts"],
            )
        last, start = state.get("last_frame"), state.get("change_start")
        camera = _Camera(
            state["key"],
            state["key_encoding"],
            Cusum(self.h, float(state["s"]), alarmed=alarm is not None),
            int(state["event_ms"]),
            None if last is None else Source.model_validate(last),
            None if start is None else Source.model_validate(start),
            alarm,
            now_s,
            int(state["partition"]),
            int(state["offset"]),
        )
        self._silent.pop(key, None)
        self._active.pop(key, None)
        (self._silent if state.get("silent") else self._active)[key] = camera
        self._alarmed.discard(key)
        if alarm is not None:
            self._alarmed.add(key)

    def drop_partitions(self, partitions: set[tuple[str, int]]) -> int:
        """Forget the cameras whose frames come from `partitions` (revoked: another member
        scores them now, from the state topic). O(cameras), on rebalances only."""
        gone = [
            key
            for cameras in (self._active, self._silent)
            for key, c in cameras.items()
            if (key[0], c.partition) in partitions
        ]
        for key in gone:
            self._active.pop(key, None)
            self._silent.pop(key, None)
            self._alarmed.discard(key)
            self.dirty.discard(key)
            self._expired.pop(key, None)
        return len(gone)
