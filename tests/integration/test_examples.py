"""The examples run for real: against the embedded broker, with a real bundle and real images.

Also the `kafka://` data source that lets `fit`, `score` and `eval` read frames off a topic.
"""

from __future__ import annotations

import importlib.util
import io
import json
import logging
import os
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np
import pytest
from kafka import KafkaProducer
from PIL import Image
from typer.testing import CliRunner

from sdns_monitor.broker import Broker, free_port
from sdns_monitor.bundle import load_bundle
from sdns_monitor.cli import app
from sdns_monitor.data import load_dataset
from sdns_monitor.detector import Detector
from sdns_monitor.errors import DataError
from sdns_monitor.frames import decode_bytes
from sdns_monitor.stream import StreamMonitor
from tests.integration.kafka_helpers import (
    LineReader,
    http_get,
    noise,
    png,
    read_all,
    read_json,
    run_settings,
    topics,
    wait_for,
)

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


def example(name: str) -> ModuleType:
    """An example script imported as a module, to run its parts in-process."""
    spec = importlib.util.spec_from_file_location(f"example_{name}", EXAMPLES / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def post(url: str, data: bytes, content_type: str | None = "image/png") -> tuple[int, Any]:
    headers = {"content-type": content_type} if content_type else {}
    request = urllib.request.Request(url, data=data, headers=headers, method="POST")
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


def send(broker: Broker, topic: str, messages: list[tuple[bytes, bytes]]) -> list[tuple[int, int]]:
    """Publish (key, value) PNG or .npy frames; their (partition, offset), in order."""
    producer = KafkaProducer(bootstrap_servers=broker.bootstrap_servers)
    futures = [
        producer.send(topic, key=key, value=value, headers=[("content-type", b"image/png")])
        for key, value in messages
    ]
    producer.flush()
    producer.close()
    return [(m.partition, m.offset) for m in (f.get(timeout=10) for f in futures)]


def _where(source: dict[str, Any]) -> str:
    """How alert_consumer.py prints a frame's position: topic/partition/offset[#frame]."""
    index = source["frame_index"]
    return f"{source['topic']}/{source['partition']}/{source['offset']}" + (
        f"#{index}" if index else ""
    )


def npy(frames: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, frames)
    return buf.getvalue()


# ---------------------------------------------------------------------- ingest_service.py
@pytest.mark.integration
def test_ingest_service_refuses_ood_uploads_and_stores_the_rest(
    tiny_bundle: Path, det: Detector, fashion_test: np.ndarray, tmp_path: Path
) -> None:
    rate = 0.05
    candidates = fashion_test[2000:2040]
    normal = candidates[~det.score(candidates, alarm_rate=rate).flags][:2]
    odd = noise(1, seed=7)
    assert len(normal) == 2 and det.score(odd, alarm_rate=rate).flags.all()
    store = tmp_path / "store"
    proc = subprocess.Popen(
        [
            sys.executable,
            str(EXAMPLES / "ingest_service.py"),
            "--model",
            str(tiny_bundle),
            "--store",
            str(store),
            "--port",
            "0",
            "--alarm-rate",
            str(rate),
            "--device",
            "cpu",
        ],
        stderr=subprocess.PIPE,
        text=True,
        env=ENV,
    )
    lines = LineReader(proc)
    try:
        wait_for(
            lambda: lines.find(r"listening on (http://\S+)") or proc.poll() is not None,
            90,
            "the service to listen",
        )
        assert proc.poll() is None, lines.text()
        url = lines.find(r"listening on (http://\S+)")[0].group(1)
        status, text = http_get(f"{url}/healthz")
        assert status == 200 and json.loads(text) == {
            "status": "ok",
            "model": "tiny",
            "hash": det.hash,
        }

        stored = []
        for image in normal:
            status, body = post(f"{url}/upload", png(image))
            expected = det.score(image, alarm_rate=rate)
            assert status == 201 and body["accepted"] is True and body["flagged"] is False, body
            assert body["p_value"] == pytest.approx(float(expected.p_values[0]))
            assert (store / body["stored"]).read_bytes() == png(image)  # stored as uploaded
            stored.append(body["stored"])
        status, again = post(f"{url}/upload", png(normal[0]))
        assert status == 201 and again["stored"] == stored[0]  # the same bytes, stored once

        status, body = post(f"{url}/upload", png(odd[0]))
        assert status == 422 and body["accepted"] is False, body
        assert body["p_value"] < rate and body["alarm_rate"] == rate
        assert body["score"] == pytest.approx(float(det.score(odd).scores[0]), rel=1e-4)

        status, body = post(f"{url}/upload", png(normal[0])[:60])  # a truncated PNG
        assert status == 400 and "PNG" in body["error"] and "\n" not in body["error"], body
        status, body = post(f"{url}/upload", b"hello", "image/jpeg")
        assert status == 400 and "content-type says 'image/jpeg'" in body["error"], body
        assert post(f"{url}/elsewhere", png(normal[0]))[0] == 404

        # The store is a data set: exactly the accepted images, readable as a folder spec.
        assert sorted(p.name for p in store.iterdir()) == sorted(stored)
        folder = load_dataset(f"folder:{store}")
        order = np.argsort(stored)
        np.testing.assert_array_equal(folder.images, normal[order])
    finally:
        proc.terminate()
        proc.wait(timeout=30)


@pytest.mark.integration
def test_ingest_service_in_tag_mode_stores_everything_with_its_verdict(
    det: Detector, fashion_test: np.ndarray, tmp_path: Path
) -> None:
    mod = example("ingest_service")
    store = tmp_path / "tagged"
    server = mod.make_server(mod.Ingest(det, store, "tag", 0.05), "127.0.0.1", 0, 4096)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{server.server_address[1]}"
    try:
        status, flagged = post(f"{url}/upload", png(noise(1, seed=8)[0]))
        assert status == 201 and flagged["accepted"] is True and flagged["flagged"] is True
        sidecar = json.loads((store / flagged["stored"]).with_suffix(".json").read_text())
        assert sidecar["flagged"] is True and sidecar["model"]["hash"] == det.hash
        assert sidecar["p_value"] == flagged["p_value"] and sidecar["content_type"] == "image/png"

        # An .npy frame is stored as PNG, so the store stays readable by folder: specs.
        status, body = post(f"{url}/upload", npy(fashion_test[2500]), "application/x-npy")
        assert status == 201 and body["stored"].endswith(".png"), body
        np.testing.assert_array_equal(
            decode_bytes((store / body["stored"]).read_bytes()), fashion_test[2500:2501]
        )
        status, body = post(f"{url}/upload", npy(fashion_test[2500:2502]), None)
        assert status == 400 and "one image per request" in body["error"]
        status, body = post(f"{url}/upload", bytes(5000))
        assert status == 413 and "exceeds 4096" in body["error"]
        assert len(list(store.glob("*.json"))) == 2
    finally:
        server.shutdown()
        server.server_close()


# ---------------------------------------------------------------------- camera_simulator.py
@pytest.mark.integration
def test_camera_simulator_publishes_keyed_frames_at_the_frame_rate(
    kafka_broker: Broker, fashion_test: np.ndarray, tmp_path: Path
) -> None:
    names = topics(kafka_broker, "frames")
    folder = tmp_path / "cam"
    folder.mkdir()
    for i, image in enumerate(fashion_test[:4]):
        (folder / f"{i:02d}.png").write_bytes(png(image))
    (folder / "notes.txt").write_text("not a frame")
    fps, count = 20.0, 10
    proc = subprocess.run(
        [
            sys.executable,
            str(EXAMPLES / "camera_simulator.py"),
            "--bootstrap-servers",
            kafka_broker.bootstrap_servers,
            "--topic",
            names["frames"],
            "--camera",
            "door-cam",
            "--frames",
            str(folder),
            "--fps",
            str(fps),
            "--count",
            str(count),
        ],
        capture_output=True,
        text=True,
        timeout=120,
        env=ENV,
    )
    assert proc.returncode == 0, proc.stderr
    assert f"sent {count} frames of camera door-cam to {names['frames']}" in proc.stderr
    records = read_all(kafka_broker, names["frames"], count + 1, timeout_ms=1000)
    assert len(records) == count  # exactly --count, cycling through the four files
    assert {r.key for r in records} == {b"door-cam"}
    assert all(r.headers == [("content-type", b"image/png")] for r in records)
    assert [r.value for r in records] == [png(fashion_test[i % 4]) for i in range(count)]
    span_s = (records[-1].timestamp - records[0].timestamp) / 1000
    assert 0.8 * (count - 1) / fps <= span_s <= (count - 1) / fps + 3.0, span_s


@pytest.mark.integration
def test_camera_simulator_encodes_a_dataset_spec(
    kafka_broker: Broker, fashion_test: np.ndarray, tmp_path: Path
) -> None:
    names = topics(kafka_broker, "frames")
    folder = tmp_path / "ref"
    folder.mkdir()
    for i, image in enumerate(fashion_test[10:13]):
        (folder / f"{i}.png").write_bytes(png(image))
    code = example("camera_simulator").main(
        [
            "--bootstrap-servers",
            kafka_broker.bootstrap_servers,
            "--topic",
            names["frames"],
            "--camera",
            "cam-9",
            "--frames",
            f"folder:{folder}",
            "--fps",
            "0",
            "--format",
            "jpeg",
        ]
    )
    assert code == 0
    records = read_all(kafka_broker, names["frames"], 4, timeout_ms=2000)
    assert len(records) == 3 and all(r.value.startswith(b"\xff\xd8\xff") for r in records)
    assert all(dict(r.headers)["content-type"] == b"image/jpeg" for r in records)
    decoded = np.concatenate([decode_bytes(r.value) for r in records]).astype(int)
    assert np.abs(decoded - fashion_test[10:13]).mean() < 8  # JPEG: close, not equal


# ---------------------------------------------------------------------- alert_consumer.py
@pytest.mark.integration
def test_alert_consumer_prints_alerts_and_saves_the_flagged_frames(
    kafka_broker: Broker,
    tiny_bundle: Path,
    det: Detector,
    fashion_test: np.ndarray,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    names = topics(kafka_broker, "frames", "alerts", partitions=2)
    odd = noise(5, seed=9)
    messages = [(b"shop-1", png(image)) for image in fashion_test[2100:2106]]
    messages += [(f"cam-{c}".encode(), png(image)) for c, image in zip("abc", odd[:3], strict=True)]
    messages.append((b"cam-d", npy(odd[3:5])))  # one message of two frames
    positions = send(kafka_broker, names["frames"], messages)
    truth = {}  # (partition, offset, frame index) -> the frame
    for (_key, value), (partition, offset) in zip(messages, positions, strict=True):
        for i, frame in enumerate(decode_bytes(value)):
            truth[(partition, offset, i)] = frame
    settings = run_settings(kafka_broker, tiny_bundle, names, incident_cooldown_s=0)
    stats = StreamMonitor(settings, detector=det).run(idle_exit_s=3.0)
    assert stats.frames == len(truth) and stats.alerts >= 5  # every noise frame, at least

    saved = tmp_path / "flagged"
    proc = subprocess.run(
        [
            sys.executable,
            str(EXAMPLES / "alert_consumer.py"),
            "--bootstrap-servers",
            kafka_broker.bootstrap_servers,
            "--alert-topic",
            names["alerts"],
            "--from-beginning",
            "--save-dir",
            str(saved),
            "--max-alerts",
            str(stats.alerts),
            "--timeout",
            "60",
        ],
        capture_output=True,
        text=True,
        timeout=120,
        env=ENV,
    )
    assert proc.returncode == 0, proc.stderr
    alerts = {
        _where(a["source"]): a for a in read_json(kafka_broker, names["alerts"], stats.alerts)
    }
    assert len(alerts) == stats.alerts
    assert sum(a["source"]["key"] == "cam-d" for a in alerts.values()) == 2  # both frames
    assert {a["source"]["key"] for a in alerts.values()} >= {"cam-a", "cam-b", "cam-c"}
    lines = proc.stdout.splitlines()
    assert len(lines) == len(alerts)
    files = set()
    for line in lines:  # ALERT KEY score S p P incident ID (frame N, alert M) WHERE -> PATH
        fields = line.split()
        alert = alerts[fields[fields.index("->") - 1]]
        source = alert["source"]
        assert fields[:3] == ["ALERT", source["key"], "score"] and fields[4] == "p", line
        assert float(fields[3]) == pytest.approx(alert["score"], abs=0.006)
        assert float(fields[5]) == pytest.approx(alert["p_value"], rel=1e-3)
        assert f"incident {alert['incident']['id']} " in line
        path = Path(fields[-1])
        frame = np.asarray(Image.open(path))[..., None]
        np.testing.assert_array_equal(
            frame, truth[(source["partition"], source["offset"], source["frame_index"])]
        )
        files.add(path)
    assert files == set(saved.iterdir())

    # Scripted runs: fewer alerts than --max-alerts within --timeout is exit status 1.
    start = time.monotonic()
    code = example("alert_consumer").main(
        [
            "--bootstrap-servers",
            kafka_broker.bootstrap_servers,
            "--alert-topic",
            names["alerts"],
            "--from-beginning",
            "--max-alerts",
            str(stats.alerts + 1),
            "--timeout",
            "2",
        ]
    )
    assert code == 1 and time.monotonic() - start < 15
    assert len(capsys.readouterr().out.splitlines()) == stats.alerts


# ---------------------------------------------------------------------- kafka:// data sets
@pytest.mark.integration
def test_kafka_spec_reads_the_frames_on_a_topic(
    kafka_broker: Broker, fashion_test: np.ndarray, caplog: pytest.LogCaptureFixture
) -> None:
    names = topics(kafka_broker, "ref", "empty", "junk", "mixed", partitions=2)
    images = fashion_test[2500:2540]
    producer = KafkaProducer(bootstrap_servers=kafka_broker.bootstrap_servers)
    for i, image in enumerate(images):
        producer.send(names["ref"], key=b"cam", value=png(image), partition=i % 2)
    producer.send(names["ref"], value=b"not an image", partition=1)
    producer.send(names["ref"], value=npy(fashion_test[2600:2602]), partition=0)
    for value in (b"junk", b""):
        producer.send(names["junk"], value=value, partition=0)
    for side in (16, 20):
        producer.send(names["mixed"], value=png(np.full((side, side, 1), 9, np.uint8)))
    producer.flush()
    producer.close()
    base = f"kafka://{kafka_broker.bootstrap_servers}"

    # Every frame, partition by partition in offset order; PNG is lossless: exactly the images.
    with caplog.at_level(logging.WARNING, logger="sdns_monitor.data.kafka_topic"):
        data = load_dataset(f"{base}/{names['ref']}?timeout_s=30")
    expected = np.concatenate([images[0::2], fashion_test[2600:2602], images[1::2]])
    np.testing.assert_array_equal(data.images, expected)
    topic = names["ref"]
    assert data.labels is None and data.sources is not None
    assert data.sources[:2] == [f"{topic}:0:0", f"{topic}:0:1"]
    assert data.sources[20:23] == [f"{topic}:0:20#0", f"{topic}:0:20#1", f"{topic}:1:0"]
    assert "skipped 1 of 42 messages read that are not images" in caplog.text

    # max=N: round-robin over the partitions, the same frames on every read.
    few = load_dataset(f"{base}/{names['ref']}?max=5")
    np.testing.assert_array_equal(few.images, images[[0, 2, 4, 1, 3]])
    sized = load_dataset(f"{base}/{names['ref']}?max=3", size=8, channels=3)
    assert sized.images.shape == (3, 8, 8, 3)

    with pytest.raises(DataError, match=r"2 different sizes .*pass a size"):
        load_dataset(f"{base}/{names['mixed']}")
    assert load_dataset(f"{base}/{names['mixed']}", size=16).images.shape == (2, 16, 16, 1)

    for spec, match in [
        (f"{base}/{names['empty']}", "holds no messages; publish frames"),
        (
            f"{base}/{names['junk']}",
            "none of the 2 messages .* is an image .*unrecognised frame format",
        ),
        (f"{base}/no-such-topic", "topic 'no-such-topic' does not exist on 127.0.0.1"),
    ]:
        with pytest.raises(DataError, match=match) as info:
            load_dataset(spec)
        assert str(info.value).startswith(spec + ": ")
    start = time.monotonic()
    unreachable = f"kafka://127.0.0.1:{free_port()}/frames?timeout_s=1"
    with pytest.raises(DataError, match=r"no Kafka broker answered at 127\.0\.0\.1:\d+ within 1 s"):
        load_dataset(unreachable)
    assert time.monotonic() - start < 10


@pytest.mark.integration
def test_fit_and_score_read_a_kafka_topic(
    kafka_broker: Broker, fashion_test: np.ndarray, tmp_path: Path
) -> None:
    names = topics(kafka_broker, "ref", partitions=2)
    images = fashion_test[1000:1200]
    producer = KafkaProducer(bootstrap_servers=kafka_broker.bootstrap_servers)
    for i, image in enumerate(images):
        producer.send(names["ref"], key=f"cam{i % 2}".encode(), value=png(image), partition=i % 2)
    producer.flush()
    producer.close()
    spec = f"kafka://{kafka_broker.bootstrap_servers}/{names['ref']}"
    out = tmp_path / "from-kafka.sdns"
    runner = CliRunner()
    fit = runner.invoke(
        app,
        [
            "fit",
            "--data",
            spec,
            "--out",
            str(out),
            "--recipe",
            "quick",
            "--epochs",
            "1",
            "--steps-per-epoch",
            "2",
            "--batch-size",
            "16",
            "--negatives",
            "off",
            "--k",
            "10",
            "--device",
            "cpu",
            "--quiet",
        ],
    )
    assert fit.exit_code == 0, fit.output
    manifest = load_bundle(out).manifest
    assert manifest.training.data == spec
    n = manifest.training.n_train + manifest.training.n_validation + manifest.calibration.n
    assert n == len(images) and manifest.input.size == 16

    score = runner.invoke(app, ["score", f"{spec}?max=4", "--model", str(out), "--device", "cpu"])
    assert score.exit_code == 0, score.output
    rows = [json.loads(line) for line in score.stdout.splitlines()]
    topic = names["ref"]
    assert [r["source"] for r in rows] == [
        f"{topic}:0:0",
        f"{topic}:0:1",
        f"{topic}:1:0",
        f"{topic}:1:1",
    ]
