"""Hostile input against the real broker (issue 13): no message stops `run`, every one is
dead-lettered, scored or named in a dead-letter reference, and the frames after it flow."""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import signal
import subprocess
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from sdns_monitor.broker import Broker
from sdns_monitor.detector import Detector
from sdns_monitor.errors import SdnsError
from sdns_monitor.stream import StreamMonitor
from tests.integration.kafka_helpers import (
    noise,
    png,
    produce,
    produce_doctored,
    read_all,
    run_command,
    run_settings,
    topics,
    wait_for,
)


def _run_until(monitor: StreamMonitor, frames: int, timeout: float = 60) -> None:
    monitor.start()
    try:
        wait_for(
            lambda: monitor.stats.frames >= frames or monitor.error is not None,
            timeout,
            f"{frames} frames scored",
        )
    finally:
        monitor.stop()


@pytest.mark.integration
def test_a_bad_frame_with_a_null_header_value_is_dead_lettered_and_the_stream_goes_on(
    kafka_broker: Broker, tiny_bundle: Path, fashion_test: np.ndarray
) -> None:
    names = topics(kafka_broker, "frames", "dlq", "scores")
    headers = [("trace", b"t-1"), ("nullable", b"")]
    # "nullable" then its value's length varint 0 becomes -1 (zigzag 0x01): a null value.
    produce_doctored(
        kafka_broker, names["frames"], b"junk", headers, {b"nullable\x00": b"nullable\x01"}
    )
    produce(kafka_broker, names["frames"], [png(fashion_test[0])])
    monitor = StreamMonitor(run_settings(kafka_broker, tiny_bundle, names))
    _run_until(monitor, 1)
    assert monitor.error is None
    (dead,) = read_all(kafka_broker, names["dlq"], 1)
    carried = dict(dead.headers)
    assert dead.value == b"junk" and carried["trace"] == b"t-1"
    assert carried["nullable"] == b"" and carried["sdns-null-headers"] == b"nullable"
    assert len(read_all(kafka_broker, names["scores"], 1)) == 1


@pytest.mark.integration
def test_a_record_the_client_cannot_parse_is_named_in_a_dead_letter_and_skipped(
    kafka_broker: Broker, tiny_bundle: Path, fashion_test: np.ndarray
) -> None:
    names = topics(kafka_broker, "frames", "dlq", "scores")
    produce(kafka_broker, names["frames"], [png(fashion_test[0])])
    # A header key that is not UTF-8 (a Java consumer reads it; kafka-python cannot).
    produce_doctored(
        kafka_broker,
        names["frames"],
        png(fashion_test[1]),
        [("key-XX", b"v")],
        {b"-XX": b"\xff\xfe\xfd"},
    )
    produce(kafka_broker, names["frames"], [png(fashion_test[2])])
    monitor = StreamMonitor(run_settings(kafka_broker, tiny_bundle, names))
    _run_until(monitor, 2)
    assert monitor.error is None
    scored = read_all(kafka_broker, names["scores"], 2)
    assert sorted(json.loads(m.value)["source"]["offset"] for m in scored) == [0, 2]
    (dead,) = read_all(kafka_broker, names["dlq"], 1)
    carried = dict(dead.headers)
    assert dead.value is None
    assert carried["sdns-source-topic"] == names["frames"].encode()
    assert carried["sdns-source-offset"] == b"1"
    assert carried["sdns-error-class"] == b"UnreadableRecord"


@pytest.mark.integration
def test_a_dead_scorer_thread_stops_run_instead_of_stalling_with_green_probes(
    kafka_broker: Broker, tiny_bundle: Path
) -> None:
    names = topics(kafka_broker, "frames", "alerts", "scores")
    produce(kafka_broker, names["frames"], [png(image) for image in noise(5, seed=3)])
    settings = run_settings(kafka_broker, tiny_bundle, names, incident_window_s=60)
    monitor = StreamMonitor(settings)

    def bug(producer: object) -> None:  # a bug on the scorer's idle path
        raise RuntimeError("bug while idle")

    monitor.scorer._close_quiet_incidents = bug  # type: ignore[method-assign]
    monitor.start()
    try:
        wait_for(lambda: monitor.error is not None, 30, "run to stop")
    finally:
        with contextlib.suppress(SdnsError):
            monitor.stop()
    assert isinstance(monitor.error, SdnsError)
    assert "the scorer thread died: RuntimeError('bug while idle')" in str(monitor.error)
    assert monitor.stats.frames == 5  # what was scored before stays delivered


def _npy(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, array)
    return buf.getvalue()


@pytest.mark.integration
def test_decompression_bombs_and_frame_floods_are_refused_before_they_cost_memory(
    kafka_broker: Broker, tiny_bundle: Path, fashion_test: np.ndarray
) -> None:
    names = topics(kafka_broker, "frames", "dlq", "scores")
    bomb = io.BytesIO()
    Image.new("RGBA", (8000, 8000)).save(bomb, "PNG")  # 250 KB; 1.2 GiB at peak to decode
    flood = _npy(np.zeros((20_000, 1, 1, 1), np.uint8))  # 20 KB; 20,000 frames
    produce(kafka_broker, names["frames"], [bomb.getvalue(), flood, png(fashion_test[0])])
    monitor = StreamMonitor(run_settings(kafka_broker, tiny_bundle, names))
    _run_until(monitor, 1)
    assert monitor.error is None and monitor.stats.frames == 1
    reasons = [dict(m.headers)["sdns-error"] for m in read_all(kafka_broker, names["dlq"], 2)]
    assert b"8000 x 8000 pixels exceeds max_pixels=8294400" in reasons[0]
    assert b"holds 20000 frames, more than max_frames_per_message=256" in reasons[1]
    assert len(read_all(kafka_broker, names["scores"], 2, timeout_ms=2000)) == 1


@pytest.mark.integration
def test_a_camera_with_a_huge_key_gets_its_alert_and_the_stream_goes_on(
    kafka_broker: Broker, tiny_bundle: Path, fashion_test: np.ndarray
) -> None:
    # A 400 KB key used to appear three times in an alert (key, source.key, incident id):
    # 1.2 MB, over the producer's 1 MiB request limit here (as over a topic's default
    # max.message.bytes), so the batch failed, was retried, failed, forever.
    names = topics(kafka_broker, "frames", "alerts", "scores")
    key = b"cam-" + b"k" * 400_000
    produce(kafka_broker, names["frames"], [png(noise(1, seed=5)[0])], key=key)
    produce(kafka_broker, names["frames"], [png(fashion_test[0])], key=b"cam-2")
    settings = run_settings(
        kafka_broker, tiny_bundle, names, alarm_rate=0.5, max_frame_bytes=200_000
    )
    monitor = StreamMonitor(settings)
    _run_until(monitor, 2)
    assert monitor.error is None and monitor.stats.output_failures == 0
    alerts = [m for m in read_all(kafka_broker, names["alerts"], 1) if m.key.startswith(b"sha256:")]
    body = json.loads(alerts[0].value)
    assert body["source"]["key_encoding"] == "sha256" and len(alerts[0].value) < 3000
    assert alerts[0].key == b"sha256:" + hashlib.sha256(key).hexdigest().encode()


class _FaultyDevice(Detector):
    """A model whose device fails for its first `faults` calls (a GPU fault that clears)."""

    faults = 12

    def anomaly_scores(self, prepared: np.ndarray) -> np.ndarray:
        if self.faults > 0:
            self.faults -= 1
            raise RuntimeError("CUDA error: an illegal memory access was encountered")
        return super().anomaly_scores(prepared)


@pytest.mark.integration
def test_a_model_fault_is_retried_not_readied_and_loses_no_frame_to_the_dead_letters(
    kafka_broker: Broker, tiny_bundle: Path, fashion_test: np.ndarray
) -> None:
    names = topics(kafka_broker, "frames", "dlq", "scores")
    produce(kafka_broker, names["frames"], [png(image) for image in fashion_test[:10]])
    settings = run_settings(kafka_broker, tiny_bundle, names, batch_size=5)
    det = _FaultyDevice(Detector.load(tiny_bundle, device="cpu").bundle, device="cpu")
    monitor = StreamMonitor(settings, detector=det)
    seen: list[str] = []
    monitor.start()
    try:
        wait_for(
            lambda: bool(seen.append(monitor.not_ready() or "")) or monitor.stats.frames >= 10,
            60,
            "every frame scored once the fault cleared",
        )
    finally:
        monitor.stop()
    assert monitor.error is None and monitor.stats.output_failures >= 1
    assert any(s.startswith("not ready: scoring failed for the last") for s in seen), seen[-5:]
    assert monitor.stats.dead_letters == 0
    assert read_all(kafka_broker, names["dlq"], 1, timeout_ms=1500) == []
    offsets = {
        json.loads(m.value)["source"]["offset"] for m in read_all(kafka_broker, names["scores"], 10)
    }
    assert offsets == set(range(10))


@pytest.mark.integration
def test_every_hostile_kind_then_normal_frames_through_run_which_exits_0_on_sigterm(
    kafka_broker: Broker, tiny_bundle: Path, fashion_test: np.ndarray, tmp_path: Path
) -> None:
    names = topics(kafka_broker, "frames", "alerts", "dlq", "scores")
    topic = names["frames"]
    bomb = io.BytesIO()
    Image.new("RGBA", (8000, 8000)).save(bomb, "PNG")
    produce_doctored(kafka_broker, topic, b"junk", [("n", b"")], {b"n\x00": b"n\x01"})
    produce_doctored(
        kafka_broker, topic, png(fashion_test[0]), [("k-X", b"v")], {b"-X": b"\xff\xfe"}
    )
    produce(kafka_broker, topic, [bomb.getvalue(), _npy(np.zeros((20_000, 1, 1, 1), np.uint8))])
    produce(kafka_broker, topic, [b""], key=b"empty")  # an empty value
    produce(kafka_broker, topic, [png(fashion_test[1])], key=b"k" * 400_000)  # scored
    normal = [png(image) for image in fashion_test[2:42]]
    produce(kafka_broker, topic, normal)
    command, env = run_command(
        kafka_broker,
        tiny_bundle,
        names,
        "--max-frame-bytes",
        "200000",
        topic=topic,
        frame_incidents=False,
    )
    log = (tmp_path / "run.log").open("w")
    proc = subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT)
    try:
        scored = read_all(kafka_broker, names["scores"], 41, timeout_ms=60_000)
        assert proc.poll() is None, (tmp_path / "run.log").read_text()[-3000:]
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=60) == 0, (tmp_path / "run.log").read_text()[-3000:]
    finally:
        if proc.poll() is None:
            proc.kill()
    offsets = sorted(json.loads(m.value)["source"]["offset"] for m in scored)
    assert offsets == list(range(5, 46))  # the huge-key frame and every normal frame
    dead = read_all(kafka_broker, names["dlq"], 5)
    classes = {
        int(dict(m.headers)["sdns-source-offset"]): dict(m.headers)["sdns-error-class"]
        for m in dead
    }
    assert classes == {
        0: b"FrameError",  # junk with a null header value
        1: b"UnreadableRecord",  # a header key that is not UTF-8: a reference
        2: b"FrameError",  # the decompression bomb
        3: b"FrameError",  # 20,000 frames
        4: b"FrameError",  # empty
    }
