"""Camera alarms: no alarm on healthy cameras, a bounded delay on a changed one, event time,
silence, undo. Fixed seeds; bounds derived from the configured expected run."""

from __future__ import annotations

import json

import numpy as np
import pytest

from sdns_monitor.records import Source
from sdns_monitor.scoring import p_values
from sdns_monitor.sequential import camera_margin, evidence, threshold
from sdns_monitor.stream.cameras import CameraAlarms, alarm_id

ERT = 63_115_200.0  # the default: a year of a camera at 2 frames/s
CALIBRATION = np.sort(np.random.default_rng(0).normal(size=1000))
T0 = 1_700_000_000_000  # event time of the first frame (ms)


def _alarms(**overrides: float) -> CameraAlarms:
    options = dict(cooldown_s=300.0, silent_after_s=300.0, expiry_s=86_400.0, max_skew_s=300.0)
    options.update(overrides)
    return CameraAlarms(threshold(ERT), **options)  # type: ignore[arg-type]


def _source(key: str, offset: int, ts: int | None = None) -> Source:
    ts = T0 + 500 * offset if ts is None else ts
    return Source(
        topic="frames", partition=0, offset=offset, key=key, key_encoding="utf-8", timestamp_ms=ts
    )


def _evidence(n: int, shift: float, seed: int) -> np.ndarray:
    """Evidence of n frames whose scores are shifted by `shift` standard deviations from the
    calibration's (0: healthy, exchangeable with it; 2.33: frame AUROC 0.95)."""
    scores = np.random.default_rng(seed).normal(loc=shift, size=n)
    return evidence(p_values(scores, CALIBRATION))


def test_evidence_takes_one_margin_per_p_value_and_a_margin_from_the_bundle() -> None:
    p = np.array([0.001, 0.3, 0.9])
    mixed = evidence(p, np.array([1.5, 3.0, 1.5]))
    assert mixed[[0, 2]] == pytest.approx(evidence(p[[0, 2]], 1.5))
    assert mixed[1] == pytest.approx(evidence(p[[1]], 3.0)[0]) and mixed[1] < evidence(p, 1.5)[1]
    assert camera_margin(None, None) == 1.5 and camera_margin(None, 1.2) == 1.5
    assert camera_margin(None, 2.5) == 2.5 and camera_margin(1.1, 2.5) == 1.1


def test_healthy_cameras_raise_no_alarm_in_ten_thousand_frames_each() -> None:
    alarms = _alarms()
    for camera in range(3):
        for i, e in enumerate(_evidence(10_000, 0.0, seed=10 + camera)):
            assert alarms.observe(_source(f"cam{camera}", i), float(e), now_s=i * 0.5) is None
    assert alarms.open_count == 0 and len(alarms) == 3


def test_a_switched_camera_alarms_within_thirty_frames_and_clears_after_it_heals() -> None:
    alarms = _alarms()
    stream = np.concatenate(
        [_evidence(300, 0.0, seed=1), _evidence(200, 2.33, seed=2), _evidence(300, 0.0, seed=3)]
    )
    events = [
        (i, ev)
        for i, e in enumerate(stream)
        if (ev := alarms.observe(_source("cam", i), float(e), i * 0.5))
    ]
    opened = [(i, ev) for i, ev in events if ev.kind == "opened"]
    cleared = [(i, ev) for i, ev in events if ev.kind == "cleared"]
    assert len(opened) == 1 and len(cleared) == 1
    at, ev = opened[0]
    assert 300 <= at < 330  # within 30 frames of the switch
    assert ev.alarm is not None and ev.alarm.id == alarm_id("cam", 0, at)
    assert abs(ev.alarm.first_frame.offset - 300) <= 10  # where the change began
    assert ev.alarm.evidence >= ev.alarm.threshold == threshold(ERT)
    done, what = cleared[0]
    assert 500 <= done < 600 and what.cleared is not None
    assert what.cleared.alarm_id == ev.alarm.id and what.cleared.frames == done - at + 1


def test_reminders_follow_the_cooldown_in_event_time_and_a_replay_gives_the_same_alarms() -> None:
    stream = np.concatenate([_evidence(50, 0.0, seed=4), _evidence(1500, 3.0, seed=5)])

    def run(now: float) -> list[tuple[str, int, int]]:
        alarms = _alarms(cooldown_s=300.0)
        out = []
        for i, e in enumerate(stream):  # frames 0.5 s apart in event time
            ev = alarms.observe(_source("cam", i), float(e), now_s=now)
            if ev is not None and ev.alarm is not None:
                out.append((ev.kind, i, ev.alarm.alerts))
        return out

    live = run(now=0.0)  # read as it was produced
    assert [kind for kind, _, _ in live] == ["opened", "reminder", "reminder"]
    opened_at = live[0][1]
    assert opened_at < 80  # 1550 frames: the last reminder 600 frames (300 s) after the first
    assert [i - opened_at for _, i, _ in live[1:]] == [600, 1200]
    assert [n for _, _, n in live] == [1, 2, 3]
    assert run(now=10_000.0) == live  # a backlog read hours later: the same alarms


def test_timestamps_far_ahead_or_behind_are_clamped_and_counted() -> None:
    alarms = _alarms(max_skew_s=60.0)
    alarms.observe(_source("cam", 0, ts=T0), 0.0)
    alarms.observe(_source("cam", 1, ts=T0 + 10**12), 0.0)  # decades ahead: clamped
    assert alarms.clamped["future"] == 1
    alarms.observe(_source("cam", 2, ts=1), 0.0)  # 1970: behind the camera's latest
    assert alarms.clamped["past"] == 1


def test_a_silent_camera_is_reported_once_per_silence_on_the_monitors_clock() -> None:
    alarms = _alarms(silent_after_s=10.0)
    alarms.observe(_source("cam1", 0), 0.0, now_s=0.0)
    alarms.observe(_source("cam2", 0), 0.0, now_s=5.0)
    assert alarms.silences(now_s=9.0) == []
    (silent,) = alarms.silences(now_s=12.0)
    assert silent.key == "cam1" and silent.last_frame.offset == 0 and silent.silent_s == 12.0
    assert alarms.silences(now_s=13.0) == []  # once per silence
    alarms.observe(_source("cam1", 1), 0.0, now_s=14.0)  # back
    assert [s.key for s in alarms.silences(now_s=16.0)] == ["cam2"]
    assert [s.key for s in alarms.silences(now_s=25.0)] == ["cam1"]  # silent again


def test_restore_undoes_the_batches_since_a_snapshot() -> None:
    alarms = _alarms()
    healthy, changed = _evidence(100, 0.0, seed=6), _evidence(100, 3.0, seed=7)
    for i, e in enumerate(healthy):
        alarms.observe(_source("cam", i), float(e), i * 0.5)
    first = alarms.snapshot()
    events = [
        alarms.observe(_source("cam", 100 + i), float(e), 50.0) for i, e in enumerate(changed[:50])
    ]
    alarms.snapshot()  # a second batch in flight
    alarms.observe(_source("new-cam", 0), 0.0, 51.0)
    assert alarms.open_count == 1 and len(alarms) == 2
    alarms.restore(first)  # the first batch failed: both are undone
    assert alarms.open_count == 0 and len(alarms) == 1
    again = [
        alarms.observe(_source("cam", 100 + i), float(e), 52.0) for i, e in enumerate(changed[:50])
    ]
    assert [None if e is None else (e.kind, e.alarm) for e in again] == [
        None if e is None else (e.kind, e.alarm) for e in events
    ]  # the retried frames open the same alarm, with the same id


def test_cameras_not_seen_for_the_expiry_are_forgotten() -> None:
    alarms = _alarms(silent_after_s=0.0, expiry_s=100.0)
    alarms.observe(_source("old", 0), 0.0, now_s=0.0)
    alarms.observe(_source("new", 0), 0.0, now_s=90.0)
    alarms.silences(now_s=150.0)
    assert len(alarms) == 1


def test_an_expired_camera_leaves_a_tombstone_unless_an_undo_brings_it_back() -> None:
    alarms = _alarms(silent_after_s=0.0, expiry_s=100.0)
    alarms.observe(_source("old", 0), 0.0, now_s=0.0)
    alarms.take_dirty()
    alarms.silences(now_s=150.0)
    assert alarms.take_dirty() == [(("frames", "old"), 0, None)]  # a tombstone for its key
    alarms.observe(_source("old", 1), 0.0, now_s=200.0)
    alarms.take_dirty()
    seq = alarms.snapshot()
    alarms.silences(now_s=400.0)  # expired in a batch that then fails
    alarms.restore(seq)
    ((key, _, state),) = alarms.take_dirty()
    assert key == ("frames", "old") and state is not None and state["offset"] == 1


def test_a_reported_silence_is_not_reported_again_after_a_restart() -> None:
    before = _alarms(silent_after_s=60.0)
    before.observe(_source("cam", 0), 0.0, now_s=0.0)
    assert len(before.silences(now_s=100.0)) == 1
    ((_, _, state),) = before.take_dirty()
    assert state is not None and state["silent"] is True
    after = _alarms(silent_after_s=60.0)
    after.install(state, now_s=100.0)
    assert after.silences(now_s=300.0) == []  # silent already: no second record
    after.observe(_source("cam", 1), 0.0, now_s=301.0)
    assert len(after.silences(now_s=400.0)) == 1  # back, then silent again: a new one


def test_a_cameras_state_survives_export_and_install_and_counts_no_frame_twice() -> None:
    before = _alarms()
    stream = np.concatenate([_evidence(50, 0.0, seed=8), _evidence(60, 3.0, seed=9)])
    events = [before.observe(_source("cam", i), float(e), 1.0) for i, e in enumerate(stream)]
    (opened,) = [e for e in events if e is not None and e.kind == "opened"]
    (key, partition, state), *_ = before.take_dirty()
    assert partition == 0
    assert key == ("frames", "cam") and state is not None and state["offset"] == 109
    after = _alarms()  # another process, after a restart or a rebalance
    after.install(json.loads(json.dumps(state)))  # through JSON, as the state topic carries it
    assert after.open_count == 1
    replayed = [after.observe(_source("cam", i), float(stream[i]), 2.0) for i in range(100, 110)]
    assert replayed == [None] * 10  # counted before: no evidence, no alert, twice
    more = after.observe(_source("cam", 110), float(stream[-1]), 2.0)
    assert more is None or more.kind == "reminder"  # the same alarm goes on
    assert opened.alarm is not None and after.export(key)["alarm"]["id"] == opened.alarm.id  # type: ignore[index]


def test_cameras_of_revoked_partitions_are_forgotten() -> None:
    alarms = _alarms()
    alarms.observe(_source("cam", 0), 0.0)
    other = Source(
        topic="frames", partition=3, offset=0, key="cam3", key_encoding="utf-8", timestamp_ms=T0
    )
    alarms.observe(other, 0.0)
    assert alarms.drop_partitions({("frames", 0)}) == 1 and len(alarms) == 1


def test_delivered_batches_let_go_of_their_undo_logs_and_later_ones_still_undo() -> None:
    alarms = _alarms()
    first = alarms.snapshot()
    alarms.observe(_source("cam", 0), 0.0, now_s=0.0)
    second = alarms.snapshot()
    alarms.observe(_source("cam", 1), 5.0, now_s=1.0)
    alarms.settled(first)  # delivered; the second is still in flight
    third = alarms.snapshot()
    assert [log.seq for log in alarms._logs] == [second, third]
    alarms.restore(second)  # the second failed: back to after the first
    assert alarms.export(("frames", "cam"))["offset"] == 0  # type: ignore[index]


def test_an_undone_batch_marks_the_cameras_it_wrote_for_writing_again() -> None:
    alarms = _alarms()
    alarms.snapshot()
    alarms.observe(_source("a", 0), 0.0, now_s=0.0)  # changed, its state not written yet
    failed = alarms.snapshot()
    alarms.observe(_source("b", 0), 0.0, now_s=0.0)
    assert {key for key, _, _ in alarms.take_dirty()} == {("frames", "a"), ("frames", "b")}
    alarms.restore(failed)  # the batch that wrote them failed: its records may not be there
    (again,) = alarms.take_dirty()  # "b" came with the undone batch: it comes back with its retry
    assert again[0] == ("frames", "a") and again[2] is not None
