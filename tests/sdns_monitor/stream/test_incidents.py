"""Incidents bound the alerts of a stuck camera and close when it is back to normal."""

from __future__ import annotations

from sdns_monitor.stream.incidents import IncidentTracker, incident_id


def test_a_stuck_camera_makes_one_incident_with_cooldown_bounded_alerts() -> None:
    t = IncidentTracker(window_s=10, cooldown_s=30)
    sent = [t.flagged("cam1", "utf-8", ms)[1] for ms in range(0, 60_000, 1000)]  # 1 flag/s
    assert sent.count(True) == 2  # at 0 s and at 30 s; the other 58 frames are counted only
    ref, _ = t.flagged("cam1", "utf-8", 60_000)
    assert ref.frames == 61 and ref.alerts == 3 and ref.id == incident_id("cam1", 0)


def test_keys_are_independent_and_a_quiet_window_closes_the_incident() -> None:
    t = IncidentTracker(window_s=10, cooldown_s=300)
    assert t.flagged("cam1", "utf-8", 0)[1] and t.flagged("cam2", "utf-8", 500)[1]
    assert t.open_count == 2
    assert t.expire(10_000) == []  # cam1's last flag is exactly one window old: still open
    (closed,) = t.expire(10_001)
    assert (closed.key, closed.incident_id, closed.frames, closed.alerts) == (
        "cam1",
        incident_id("cam1", 0),
        1,
        1,
    )
    assert closed.closed_at_ms == 10_001 and t.open_count == 1
    ref, sent = t.flagged("cam1", "utf-8", 12_000)  # back after the window: a new incident
    assert sent and ref.id == incident_id("cam1", 12_000)


def test_zero_cooldown_alerts_every_flagged_frame() -> None:
    t = IncidentTracker(window_s=10, cooldown_s=0)
    assert all(t.flagged(None, None, ms)[1] for ms in range(0, 5000, 100))


def test_restoring_a_snapshot_forgets_a_batch_that_was_not_delivered() -> None:
    t = IncidentTracker(window_s=10, cooldown_s=30)
    before = t.snapshot()
    assert t.flagged("cam1", "utf-8", 0)[1]  # this alert was never delivered ...
    t.restore(before)
    ref, send = t.flagged("cam1", "utf-8", 500)  # ... so the retried frame sends it
    assert send and ref.frames == 1 and ref.alerts == 1
    snap = t.snapshot()
    t.flagged("cam1", "utf-8", 600)
    t.restore(snap)
    assert t.flagged("cam1", "utf-8", 700)[0].frames == 2  # the snapshot was a copy


def test_the_incident_id_is_short_whatever_the_key() -> None:
    long_key = "k" * 400_000
    assert incident_id(long_key, 5) == incident_id(long_key, 5)
    assert len(incident_id(long_key, 5)) == 16 + 1 + 1 and incident_id(long_key, 5).endswith("@5")
    assert incident_id("cam1", 5) != incident_id("cam2", 5) != incident_id(None, 5)
