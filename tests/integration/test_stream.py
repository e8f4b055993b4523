"""StreamMonitor against the real broker: alerts, scores, dead letters, commits."""

from __future__ import annotations

import io
import json
import os
import signal
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

import numpy as np
import pytest
from kafka import KafkaAdminClient, KafkaConsumer, KafkaProducer
from kafka.admin import NewTopic
from PIL import Image

from sdns_monitor.broker import Broker
from sdns_monitor.detector import Detector
from sdns_monitor.settings import load_settings
from sdns_monitor.stream import StreamMonitor

# Tansu needs short group timeouts; metrics on a free port so tests never collide.
TANSU = {"session_timeout_ms": 6000, "heartbeat_interval_ms": 1000, "metrics_port": 0}


def _png(image: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(image.squeeze(-1)).save(buf, format="PNG")
    return buf.getvalue()


def _noise_camera(broker: Broker, key: bytes, n: int, seed: int) -> tuple[str, str, str]:
    """New one-partition frames and alerts topics; `n` noise PNG frames of camera `key`.

    Returns (run id, frames topic, alerts topic)."""
    run_id = uuid.uuid4().hex[:8]
    frames_topic, alerts_topic = f"frames-{run_id}", f"alerts-{run_id}"
    admin = KafkaAdminClient(bootstrap_servers=broker.bootstrap_servers)
    admin.create_topics([NewTopic(t, 1, 1) for t in (frames_topic, alerts_topic)])
    admin.close()
    producer = KafkaProducer(bootstrap_servers=broker.bootstrap_servers)
    for image in np.random.default_rng(seed).integers(0, 256, (n, 16, 16, 1), dtype=np.uint8):
        producer.send(frames_topic, key=key, value=_png(image))
    producer.flush()
    producer.close()
    return run_id, frames_topic, alerts_topic


def _read_all(broker: Broker, topic: str, expect: int, timeout_ms: int = 8000) -> list:
    consumer = KafkaConsumer(
        topic, bootstrap_servers=broker.bootstrap_servers, auto_offset_reset="earliest",
        consumer_timeout_ms=timeout_ms, group_id=None,
    )  # fmt: skip
    out = []
    for m in consumer:
        out.append(m)
        if len(out) >= expect:
            break
    consumer.close()
    return out


@pytest.mark.integration
def test_monitor_scores_every_frame_alerts_and_dead_letters(
    kafka_broker: Broker, tiny_bundle: Path, det: Detector, fashion_test: np.ndarray
) -> None:
    run_id = uuid.uuid4().hex[:8]
    topics = {name: f"{name}-{run_id}" for name in ("frames", "alerts", "dlq", "scores")}
    admin = KafkaAdminClient(bootstrap_servers=kafka_broker.bootstrap_servers)
    admin.create_topics(
        [NewTopic(t, num_partitions=2, replication_factor=1) for t in topics.values()]
    )
    admin.close()

    id_frames = fashion_test[2000:2030]
    noise = np.random.default_rng(0).integers(0, 256, (5, 16, 16, 1), dtype=np.uint8)
    producer = KafkaProducer(bootstrap_servers=kafka_broker.bootstrap_servers)
    messages: list[tuple[bytes, bytes, list[tuple[str, bytes]]]] = []
    messages += [(f"cam{i % 3}".encode(), _png(image), []) for i, image in enumerate(id_frames)]
    messages += [(b"\xffbroken", _png(image), []) for image in noise]
    batch = io.BytesIO()
    np.save(batch, fashion_test[2100:2104])  # one message holding 4 frames
    messages.append((b"batch", batch.getvalue(), []))
    messages.append((b"bad", b"not an image", [("content-type", b"image/png")]))
    for key, value, headers in messages:
        producer.send(topics["frames"], key=key, value=value, headers=headers)
    sent = len(messages)
    producer.flush()
    producer.close()

    settings = load_settings(
        {
            "topic": [topics["frames"]], "model": str(tiny_bundle),
            "bootstrap_servers": kafka_broker.bootstrap_servers, "group_id": f"g-{run_id}",
            "alert_topic": topics["alerts"], "dlq_topic": topics["dlq"],
            "scores_topic": topics["scores"], "from_beginning": True, "batch_size": 16,
            "alarm_rate": 0.1, "incident_cooldown_s": 0, **TANSU,
        },
        {},
    )  # fmt: skip
    seen_alerts = []
    monitor = StreamMonitor(settings, detector=det, on_alert=seen_alerts.append)
    stats = monitor.run(threading.Event(), idle_exit_s=4.0)
    n_frames = 30 + 5 + 4
    assert stats.messages == sent and stats.frames == n_frames and stats.dead_letters == 1

    scores = [json.loads(m.value) for m in _read_all(kafka_broker, topics["scores"], n_frames)]
    assert len(scores) == n_frames
    positions = {
        (s["source"]["partition"], s["source"]["offset"], s["source"]["frame_index"])
        for s in scores
    }
    assert len(positions) == n_frames  # every frame once
    assert sorted(s["source"]["frame_index"] for s in scores if s["source"]["key"] == "batch") == [
        0,
        1,
        2,
        3,
    ]
    broken = [s for s in scores if s["source"]["key_encoding"] == "base64"]
    assert len(broken) == 5 and all(s["flagged"] for s in broken)  # noise is far from Fashion-MNIST

    alerts = [json.loads(m.value) for m in _read_all(kafka_broker, topics["alerts"], stats.alerts)]
    # With no cooldown every flagged frame is an alert, each inside its key's incident.
    assert len(alerts) == stats.alerts == sum(s["flagged"] for s in scores) == len(seen_alerts)
    assert all(a["incident"]["id"].startswith(f"{a['source']['key']}@") for a in alerts)
    assert all(a["p_value"] < 0.1 and a["alarm_rate"] == 0.1 for a in alerts)
    assert all(a["model"]["hash"] == det.hash for a in alerts)

    (dead,) = _read_all(kafka_broker, topics["dlq"], 1)
    assert dead.key == b"bad" and dead.value == b"not an image"
    headers = dict(dead.headers)
    assert headers["content-type"] == b"image/png"
    assert headers["sdns-error-class"] == b"FrameError"
    assert headers["sdns-source-topic"] == topics["frames"].encode()

    # Everything was committed: the group has nothing left to read.
    again = StreamMonitor(settings, detector=det).run(threading.Event(), idle_exit_s=3.0)
    assert again.messages == 0


@pytest.mark.integration
def test_cli_run_stops_cleanly_on_sigterm(
    kafka_broker: Broker, tiny_bundle: Path, fashion_test: np.ndarray
) -> None:
    run_id, frames_topic, alerts_topic = _noise_camera(kafka_broker, b"cam", 3, seed=1)
    env = {
        **os.environ,
        "SDNS_BOOTSTRAP_SERVERS": kafka_broker.bootstrap_servers,
        "SDNS_SESSION_TIMEOUT_MS": "6000",
        "SDNS_HEARTBEAT_INTERVAL_MS": "1000",
        "SDNS_METRICS_PORT": "0",
        "OMP_NUM_THREADS": "1",
    }
    proc = subprocess.Popen(
        [sys.executable, "-m", "sdns_monitor.cli", "run", "--topic", frames_topic,
         "--model", str(tiny_bundle), "--alert-topic", alerts_topic, "--from-beginning",
         "--alarm-rate", "0.1", "--group-id", f"g-{run_id}"],
        env=env, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        alerts = _read_all(kafka_broker, alerts_topic, 1, timeout_ms=60000)
        assert len(alerts) == 1  # three noise frames of one camera: one incident, one alert
        assert json.loads(alerts[0].value)["incident"]["frames"] == 1
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
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert proc.returncode == 2
    assert proc.stderr.startswith("error: ") and proc.stderr.count("\n") == 1
    assert "give at least one --topic" in proc.stderr


@pytest.mark.integration
def test_a_broken_camera_is_one_incident_that_closes(
    kafka_broker: Broker, tiny_bundle: Path, det: Detector
) -> None:
    run_id, frames_topic, alerts_topic = _noise_camera(kafka_broker, b"cam7", 6, seed=2)
    settings = load_settings(
        {
            "topic": [frames_topic], "model": str(tiny_bundle), "alert_topic": alerts_topic,
            "bootstrap_servers": kafka_broker.bootstrap_servers, "group_id": f"g-{run_id}",
            "from_beginning": True, "alarm_rate": 0.1, "incident_window_s": 1.0,
            "incident_cooldown_s": 300, **TANSU,
        },
        {},
    )  # fmt: skip
    stats = StreamMonitor(settings, detector=det).run(threading.Event(), idle_exit_s=4.0)
    assert (stats.frames, stats.flagged, stats.alerts, stats.incidents_closed) == (6, 6, 1, 1)
    records = [json.loads(m.value) for m in _read_all(kafka_broker, alerts_topic, 2)]
    assert [r["kind"] for r in records] == ["alert", "incident-closed"]
    alert, closed = records
    assert closed["incident_id"] == alert["incident"]["id"] and closed["key"] == "cam7"
    assert (closed["frames"], closed["alerts"]) == (6, 1)
