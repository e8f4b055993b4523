"""StreamMonitor against the real broker: alerts, scores, dead letters, commits, incidents."""

from __future__ import annotations

import io
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from kafka import KafkaProducer

from sdns_monitor.broker import Broker
from sdns_monitor.detector import Detector
from sdns_monitor.stream import StreamMonitor
from sdns_monitor.stream.incidents import incident_id
from tests.integration.kafka_helpers import (
    noise,
    png,
    produce,
    read_all,
    read_json,
    run_command,
    run_settings,
    topics,
)


@pytest.mark.integration
def test_monitor_scores_every_frame_alerts_and_dead_letters(
    kafka_broker: Broker, tiny_bundle: Path, det: Detector, fashion_test: np.ndarray
) -> None:
    names = topics(kafka_broker, "frames", "alerts", "dlq", "scores", partitions=2)
    messages: list[tuple[bytes, bytes, list[tuple[str, bytes]]]] = []
    messages += [
        (f"cam{i % 3}".encode(), png(image), []) for i, image in enumerate(fashion_test[2000:2030])
    ]
    messages += [(b"\xffbroken", png(image), []) for image in noise(5, seed=0)]
    batch = io.BytesIO()
    np.save(batch, fashion_test[2100:2104])  # one message holding 4 frames
    messages.append((b"batch", batch.getvalue(), []))
    messages.append((b"bad", b"not an image", [("content-type", b"image/png")]))
    producer = KafkaProducer(bootstrap_servers=kafka_broker.bootstrap_servers)
    for key, value, headers in messages:
        producer.send(names["frames"], key=key, value=value, headers=headers)
    producer.flush()
    producer.close()

    settings = run_settings(kafka_broker, tiny_bundle, names, batch_size=16, incident_cooldown_s=0)
    seen_alerts = []
    monitor = StreamMonitor(settings, detector=det, on_alert=seen_alerts.append)
    stats = monitor.run(idle_exit_s=4.0)
    n_frames = 30 + 5 + 4
    assert stats.messages == len(messages) and stats.frames == n_frames
    assert stats.dead_letters == 1

    scores = read_json(kafka_broker, names["scores"], n_frames)
    assert len(scores) == n_frames
    positions = {
        (s["source"]["partition"], s["source"]["offset"], s["source"]["frame_index"])
        for s in scores
    }
    assert len(positions) == n_frames  # every frame once
    batch_indices = [s["source"]["frame_index"] for s in scores if s["source"]["key"] == "batch"]
    assert sorted(batch_indices) == [0, 1, 2, 3]
    broken = [s for s in scores if s["source"]["key_encoding"] == "base64"]
    assert len(broken) == 5 and all(s["flagged"] for s in broken)  # noise is far from Fashion-MNIST

    alerts = read_json(kafka_broker, names["alerts"], stats.alerts)
    # With no cooldown every flagged frame is an alert, each inside its key's incident.
    assert len(alerts) == stats.alerts == sum(s["flagged"] for s in scores) == len(seen_alerts)
    assert all(
        a["incident"]["id"] == incident_id(a["source"]["key"], a["incident"]["opened_at_ms"])
        for a in alerts
    )
    assert all(a["p_value"] < 0.1 and a["alarm_rate"] == 0.1 for a in alerts)
    assert all(a["model"]["hash"] == det.hash for a in alerts)

    (dead,) = read_all(kafka_broker, names["dlq"], 1)
    assert dead.key == b"bad" and dead.value == b"not an image"
    headers = dict(dead.headers)
    assert headers["content-type"] == b"image/png"
    assert headers["sdns-error-class"] == b"FrameError"
    assert headers["sdns-source-topic"] == names["frames"].encode()

    # Everything was committed: the group has nothing left to read.
    again = StreamMonitor(settings, detector=det).run(idle_exit_s=3.0)
    assert again.messages == 0


@pytest.mark.integration
def test_cli_run_stops_cleanly_on_sigterm(kafka_broker: Broker, tiny_bundle: Path) -> None:
    names = topics(kafka_broker, "frames", "alerts")
    produce(kafka_broker, names["frames"], [png(image) for image in noise(3, seed=1)])
    command, env = run_command(kafka_broker, tiny_bundle, names)
    proc = subprocess.Popen(
        command,
        env=env,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        alerts = read_json(kafka_broker, names["alerts"], 1, timeout_ms=60000)
        assert len(alerts) == 1  # three noise frames of one camera: one incident, one alert
        assert alerts[0]["incident"]["frames"] == 1
        time.sleep(0.5)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 0
        err = proc.stderr.read() if proc.stderr else ""
        assert "stopped: 3 messages, 3 frames, 3 flagged, 1 alerts, 0 dead letters" in err
    finally:
        proc.kill()


@pytest.mark.integration
def test_cli_run_bad_configuration_is_exit_2(tiny_bundle: Path) -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "sdns_monitor.cli", "run", "--model", str(tiny_bundle)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2
    assert proc.stderr.startswith("error: ") and proc.stderr.count("\n") == 1
    assert "give at least one --topic" in proc.stderr


@pytest.mark.integration
def test_a_broken_camera_is_one_incident_that_closes(
    kafka_broker: Broker, tiny_bundle: Path, det: Detector
) -> None:
    names = topics(kafka_broker, "frames", "alerts")
    produce(kafka_broker, names["frames"], [png(image) for image in noise(6, seed=2)], key=b"cam7")
    settings = run_settings(
        kafka_broker, tiny_bundle, names, incident_window_s=1.0, incident_cooldown_s=300
    )
    stats = StreamMonitor(settings, detector=det).run(idle_exit_s=4.0)
    assert (stats.frames, stats.flagged, stats.alerts, stats.incidents_closed) == (6, 6, 1, 1)
    records = read_json(kafka_broker, names["alerts"], 2)
    assert [r["kind"] for r in records] == ["alert", "incident-closed"]
    alert, closed = records
    assert closed["incident_id"] == alert["incident"]["id"] and closed["key"] == "cam7"
    assert (closed["frames"], closed["alerts"]) == (6, 1)


@pytest.mark.integration
def test_in_distribution_frames_are_flagged_at_the_alarm_rate(
    kafka_broker: Broker, tiny_bundle: Path, det: Detector, fashion_test: np.ndarray
) -> None:
    """Independent in-distribution frames (Fashion-MNIST test images in neither the tiny
    bundle's bank nor its calibration set) are flagged at about the alarm rate: conformal
    p-values, end to end through the stream."""
    names = topics(kafka_broker, "frames", "scores")
    frames = fashion_test[600:1400]
    produce(kafka_broker, names["frames"], [png(image) for image in frames])
    settings = run_settings(kafka_broker, tiny_bundle, names, alarm_rate=0.1, batch_size=128)
    stats = StreamMonitor(settings, detector=det).run(idle_exit_s=3.0)
    n, alpha = len(frames), 0.1
    assert stats.frames == n
    sd = (n * alpha * (1 - alpha)) ** 0.5
    # Within 4 binomial standard deviations of n * alpha (a false failure once in ~15,000 runs).
    assert abs(stats.flagged - n * alpha) <= 4 * sd, (stats.flagged, n * alpha, sd)
