"""Operating `run`: metrics and probes, delivery failures, hot reload, compressed topics,
scaling out to two processes, and a SIGKILL restart that loses nothing."""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from kafka import KafkaAdminClient, KafkaConsumer, TopicPartition
from kafka.admin import NewTopic

from sdns_monitor.broker import Broker, start_broker
from sdns_monitor.detector import Detector
from sdns_monitor.settings import load_settings
from sdns_monitor.stream import StreamMonitor
from tests.integration.kafka_helpers import (
    LineReader,
    http_get,
    local_s3,
    metric,
    noise,
    png,
    produce,
    read_all,
    read_json,
    run_command,
    run_settings,
    topics,
    wait_for,
)


def _committed(broker: Broker, group: str, topic: str) -> int | None:
    consumer = KafkaConsumer(bootstrap_servers=broker.bootstrap_servers, group_id=group)
    try:
        return consumer.committed(TopicPartition(topic, 0))
    finally:
        consumer.close()


@pytest.mark.integration
def test_metrics_and_probes_follow_the_stream(
    kafka_broker: Broker, tiny_bundle: Path, det: Detector, fashion_test: np.ndarray
) -> None:
    names = topics(kafka_broker, "frames", "alerts")
    settings = run_settings(kafka_broker, tiny_bundle, names, incident_cooldown_s=0)
    monitor = StreamMonitor(settings, detector=det)
    assert monitor.not_ready() is not None  # not joined yet
    monitor.start()
    try:
        assert monitor.wait_ready(30)
        assert monitor.health is not None and monitor.health.host == "127.0.0.1"
        base = f"http://127.0.0.1:{monitor.health.port}"
        assert http_get(base + "/readyz") == (200, "ok\n")
        assert http_get(base + "/healthz") == (200, "ok\n")
        assert http_get(base + "/nothing")[0] == 404

        frames = [png(image) for image in fashion_test[2200:2210]] + [
            png(image) for image in noise(3, seed=3)
        ]
        produce(kafka_broker, names["frames"], frames)
        wait_for(lambda: monitor.stats.frames == 13, 30, "13 frames scored")
        status, text = http_get(base + "/metrics")
        assert status == 200
        topic = names["frames"]
        assert metric(text, "sdns_frames_total", topic=topic) == 13
        assert metric(text, "sdns_messages_total", topic=topic) == 13
        flagged = metric(text, "sdns_flagged_frames_total", topic=topic)
        assert flagged == monitor.stats.flagged >= 3
        assert metric(text, "sdns_alerts_total", topic=topic) == monitor.stats.alerts == flagged
        assert metric(text, "sdns_batch_latency_seconds_count") >= 1
        # Gauges are refreshed twice a second, not with every batch.
        gauges = f"{base}/metrics"
        lag = f'sdns_consumer_lag{{topic="{topic}"}} 0.0'
        wait_for(lambda: lag in http_get(gauges)[1], 10, "no lag")
        assert metric(http_get(gauges)[1], "sdns_ready") == 1
        assert metric(text, "sdns_model_info", name="tiny", hash=det.hash) == 1
    finally:
        stats = monitor.stop()
    assert stats.frames == 13


@pytest.mark.integration
def test_outputs_the_broker_refuses_for_good_become_dead_letter_references(
    tmp_path: Path, tiny_bundle: Path, det: Detector
) -> None:
    """The broker refuses every alert (a schema the alerts do not meet: INVALID_RECORD, which
    no retry can fix). Each refused alert becomes a dead-letter reference to its frame, counted,
    and the stream goes on and commits, rather than retrying the batch forever."""
    schemas = tmp_path / "schemas"
    schemas.mkdir()
    with start_broker(log=tmp_path / "tansu.log", schema_registry=schemas) as broker:
        names = topics(broker, "frames", "alerts", "dlq")
        (schemas / f"{names['alerts']}.json").write_text(
            json.dumps({"type": "object", "properties": {"value": {"required": ["never"]}}})
        )
        produce(broker, names["frames"], [png(image) for image in noise(3, seed=4)])
        settings = run_settings(broker, tiny_bundle, names, incident_cooldown_s=0)
        monitor = StreamMonitor(settings, detector=det)
        stats = monitor.run(idle_exit_s=3.0)
        assert (stats.frames, stats.alerts, stats.output_failures) == (3, 3, 0)
        refused = metric(
            monitor.metrics.exposition().decode(),
            "sdns_refused_records_total",
            topic=names["alerts"],
        )
        assert refused == 3
        dead = read_all(broker, names["dlq"], 3)
        headers = [dict(m.headers) for m in dead]
        assert [h["sdns-error-class"] for h in headers] == [b"OutputRefused"] * 3
        assert sorted(int(h["sdns-source-offset"]) for h in headers) == [0, 1, 2]
        assert all(m.value is None for m in dead)
        assert _committed(broker, settings.group_id, names["frames"]) == 3


@pytest.mark.integration
def test_a_broker_outage_is_survived(tmp_path: Path, tiny_bundle: Path, det: Detector) -> None:
    """The broker stops and comes back on the same port (in-memory storage: empty again). The
    monitor neither crashes nor stalls, says not ready meanwhile, and scores what arrives
    afterwards."""
    broker = start_broker(log=tmp_path / "tansu.log")
    names = topics(broker, "frames", "alerts")
    produce(broker, names["frames"], [png(image) for image in noise(5, seed=8)])
    settings = run_settings(broker, tiny_bundle, names, incident_cooldown_s=0)
    monitor = StreamMonitor(settings, detector=det).start()
    restarted = None
    try:
        wait_for(lambda: monitor.stats.frames == 5, 30, "the first frames")
        broker.stop()
        wait_for(lambda: monitor.not_ready() is not None, 30, "not ready during the outage")
        assert "broker down" in (monitor.not_ready() or "") and monitor.not_alive() is None
        restarted = start_broker(broker.port, log=tmp_path / "tansu2.log")
        admin = KafkaAdminClient(bootstrap_servers=restarted.bootstrap_servers)
        admin.create_topics([NewTopic(names[t], 1, 1) for t in ("frames", "alerts")])
        admin.close()
        produce(restarted, names["frames"], [png(image) for image in noise(3, seed=9)])
        wait_for(lambda: monitor.stats.frames == 8, 90, "frames after the restart")
        wait_for(lambda: monitor.not_ready() is None, 30, "ready again")
        assert len(read_json(restarted, names["alerts"], 3)) == 3  # the new frames' alerts
    finally:
        monitor.stop()
        if restarted is not None:
            restarted.stop()
    assert monitor.error is None


@pytest.mark.integration
def test_an_outage_of_a_durable_broker_loses_nothing(
    tmp_path: Path, tiny_bundle: Path, det: Detector, fashion_test: np.ndarray
) -> None:
    """Tansu on S3 storage (a local S3 server) is killed mid-stream and restarted: its topics
    and the group's committed offsets survive, so every frame before and after the outage is
    scored (at least once) and every flagged frame alerted. Duplicates can come only from the
    batches in flight when the broker died."""
    batch, in_flight = 8, 4
    with local_s3(tmp_path / "s3.log") as s3:
        storage = "s3://tansu/"
        broker = start_broker(log=tmp_path / "tansu.log", storage=storage, env=s3)
        names = topics(broker, "frames", "alerts", "scores")
        first = [png(im) for im in fashion_test[2300:2340]] + [png(im) for im in noise(8, 11)]
        produce(broker, names["frames"], first)
        settings = run_settings(
            broker,
            tiny_bundle,
            names,
            incident_cooldown_s=0,
            batch_size=batch,
            queue_batches=in_flight,
        )
        monitor = StreamMonitor(settings, detector=det).start()
        restarted = None
        try:
            wait_for(lambda: monitor.stats.frames >= 16, 60, "some frames scored")
            broker.process.kill()  # a crash, not a clean shutdown
            broker.process.wait(10)
            wait_for(lambda: monitor.not_ready() is not None, 30, "not ready during the outage")
            time.sleep(2)  # the monitor keeps retrying meanwhile
            assert monitor.error is None and monitor.not_alive() is None
            restarted = start_broker(
                broker.port, log=tmp_path / "tansu2.log", storage=storage, env=s3
            )
            second = [png(im) for im in fashion_test[2340:2360]] + [png(im) for im in noise(4, 12)]
            produce(restarted, names["frames"], second)
            total = len(first) + len(second)
            wait_for(
                lambda: _committed(restarted, settings.group_id, names["frames"]) == total,
                120,
                "every frame committed after the restart",
            )
            wait_for(lambda: monitor.not_ready() is None, 30, "ready again")
            scores = read_json(restarted, names["scores"], 10**6, timeout_ms=3000)
            alerts = read_json(restarted, names["alerts"], 10**6, timeout_ms=3000)
        finally:
            monitor.stop()
            if restarted is not None:
                restarted.stop()
    assert monitor.error is None
    seen = Counter(r["source"]["offset"] for r in scores)
    assert set(seen) == set(range(total)), "a frame was lost across the outage"
    duplicates = sum(n - 1 for n in seen.values())
    assert duplicates <= batch * in_flight, (
        f"{duplicates} duplicates: more than the batches in flight"
    )
    flagged = {r["source"]["offset"] for r in scores if r["flagged"]}
    assert {a["source"]["offset"] for a in alerts} == flagged
    assert set(range(40, 48)) | set(range(total - 4, total)) <= flagged  # the noise frames
    print(f"durable outage: {total} frames, {duplicates} duplicates, {len(flagged)} flagged")


def _renamed_copy(bundle: Path, out: Path, name: str) -> Path:
    """The same bundle under another name: a different manifest, so a different hash."""
    shutil.copytree(bundle, out)
    manifest = json.loads((out / "manifest.json").read_text())
    manifest["name"] = name
    (out / "manifest.json").write_text(json.dumps(manifest))
    return out


@pytest.mark.integration
def test_keys_are_routed_to_their_bundles_and_a_route_reloads_alone(
    kafka_broker: Broker, tiny_bundle: Path, tmp_path: Path
) -> None:
    """One run, two models: frames of cam-b are scored by the lobby bundle, all other keys by
    the default; swapping the lobby bundle reloads it alone."""
    names = topics(kafka_broker, "frames", "alerts", "scores")
    v1 = _renamed_copy(tiny_bundle, tmp_path / "lobby-v1.sdns", "lobby-v1")
    v2 = _renamed_copy(tiny_bundle, tmp_path / "lobby-v2.sdns", "lobby-v2")
    lobby = tmp_path / "lobby.sdns"
    lobby.symlink_to(v1)
    config = tmp_path / "config.toml"
    config.write_text(f"[[routes]]\nkeys = ['cam-b']\nmodel = '{lobby}'\n")
    base = run_settings(kafka_broker, tiny_bundle, names, device="cpu", reload_check_s=0.2)
    settings = load_settings(
        {k: v for k, v in base.model_dump().items() if k not in ("security", "routes")},
        {},
        config,
    )
    monitor = StreamMonitor(settings).start()
    try:
        assert monitor.wait_ready(30)
        frames = [png(im) for im in noise(2, seed=21)]
        produce(kafka_broker, names["frames"], frames, key=b"cam-a")
        produce(kafka_broker, names["frames"], frames, key=b"cam-b")
        wait_for(lambda: monitor.stats.frames == 4, 30, "four frames")
        swap = tmp_path / "next.sdns"
        swap.symlink_to(v2)
        swap.replace(lobby)
        wait_for(lambda: monitor.stats.reloads == 1, 30, "the lobby bundle reloaded")
        produce(kafka_broker, names["frames"], frames, key=b"cam-b")
        produce(kafka_broker, names["frames"], frames[:1], key=b"cam-a")
        wait_for(lambda: monitor.stats.frames == 7, 30, "seven frames")
    finally:
        monitor.stop()
    records = read_all(kafka_broker, names["scores"], 7)
    by_key = [(m.key, json.loads(m.value)["model"]["name"]) for m in records]
    assert by_key == [(b"cam-a", "tiny")] * 2 + [(b"cam-b", "lobby-v1")] * 2 + [
        (b"cam-b", "lobby-v2")
    ] * 2 + [(b"cam-a", "tiny")]
    assert monitor.detector.name == "tiny"  # the default was not reloaded


@pytest.mark.integration
def test_hot_reload_swaps_the_model_between_batches(
    kafka_broker: Broker, tiny_bundle: Path, tmp_path: Path
) -> None:
    names = topics(kafka_broker, "frames", "alerts")
    v1 = _renamed_copy(tiny_bundle, tmp_path / "v1.sdns", "v1")
    v2 = _renamed_copy(tiny_bundle, tmp_path / "v2.sdns", "v2")
    current = tmp_path / "current.sdns"
    current.symlink_to(v1)
    settings = run_settings(
        kafka_broker, current, names, incident_cooldown_s=0, reload_check_s=0.2, device="cpu"
    )
    monitor = StreamMonitor(settings).start()
    try:
        assert monitor.wait_ready(30)
        produce(kafka_broker, names["frames"], [png(noise(1, seed=5)[0])])
        wait_for(lambda: monitor.stats.alerts == 1, 30, "the first alert")

        # A deploy swaps the symlink: the monitor notices the bundle changed and reloads.
        tmp = tmp_path / "next.sdns"
        tmp.symlink_to(v2)
        tmp.replace(current)
        wait_for(lambda: monitor.stats.reloads == 1, 30, "the reload")
        produce(kafka_broker, names["frames"], [png(noise(1, seed=6)[0])])
        wait_for(lambda: monitor.stats.alerts == 2, 30, "the second alert")

        # A broken bundle is refused; the model in use stays.
        (v1 / "manifest.json").write_text("{}")
        monitor.reload(v1)
        wait_for(lambda: monitor.stats.reload_failures == 1, 30, "the refused reload")
        produce(kafka_broker, names["frames"], [png(noise(1, seed=7)[0])])
        wait_for(lambda: monitor.stats.alerts == 3, 30, "the third alert")
    finally:
        monitor.stop()
    alerts = read_json(kafka_broker, names["alerts"], 3)
    assert [a["model"]["name"] for a in alerts] == ["v1", "v2", "v2"]
    assert alerts[0]["model"]["hash"] != alerts[1]["model"]["hash"]


@pytest.mark.integration
@pytest.mark.parametrize("codec", ["gzip", "snappy", "lz4", "zstd"])
def test_compressed_topics_are_read(
    kafka_broker: Broker, tiny_bundle: Path, det: Detector, fashion_test: np.ndarray, codec: str
) -> None:
    names = topics(kafka_broker, "frames")
    frames = [png(image) for image in fashion_test[2300:2308]]
    produce(kafka_broker, names["frames"], frames, compression_type=codec)
    settings = run_settings(kafka_broker, tiny_bundle, names, metrics_port="off")
    stats = StreamMonitor(settings, detector=det).run(idle_exit_s=2.0)
    assert (stats.messages, stats.frames, stats.dead_letters) == (8, 8, 0)


@pytest.mark.integration
def test_a_topic_pattern_watches_every_matching_topic(
    kafka_broker: Broker, tiny_bundle: Path, det: Detector, fashion_test: np.ndarray
) -> None:
    names = topics(kafka_broker, "cams-a", "cams-b", "other")
    run_id = names["run_id"]
    for i, role in enumerate(("cams-a", "cams-b", "other")):
        produce(kafka_broker, names[role], [png(fashion_test[2500 + i])])
    settings = run_settings(
        kafka_broker,
        tiny_bundle,
        {"frames": "unused", "run_id": run_id},
        topic=[],
        topic_pattern=rf"cams-.-{run_id}",
    )
    monitor = StreamMonitor(settings, detector=det)
    stats = monitor.run(idle_exit_s=3.0)
    assert (stats.messages, stats.frames) == (2, 2)  # both camera topics, not "other"
    frames = monitor.metrics.frames
    assert {s.labels["topic"] for s in frames.collect()[0].samples} == {
        names["cams-a"],
        names["cams-b"],
    }


class _PoisonedDetector(Detector):
    """A model with a bug on one kind of input (all-white frames): scoring them raises."""

    def anomaly_scores(self, prepared: np.ndarray) -> np.ndarray:
        if (prepared.reshape(len(prepared), -1).min(axis=1) == 255).any():
            raise RuntimeError("model bug on white frames")
        return super().anomaly_scores(prepared)


@pytest.mark.integration
def test_a_frame_the_model_cannot_score_is_a_dead_letter_and_the_rest_flows(
    kafka_broker: Broker, tiny_bundle: Path, fashion_test: np.ndarray
) -> None:
    names = topics(kafka_broker, "frames", "dlq", "scores")
    white = np.full((16, 16, 1), 255, np.uint8)
    frames = [png(fashion_test[2600 + i]) for i in range(20)]
    frames.insert(7, png(white))
    produce(kafka_broker, names["frames"], frames)
    det = _PoisonedDetector(Detector.load(tiny_bundle, device="cpu").bundle, device="cpu")
    # queue_batches=1 and tiny batches: the sequential extreme of the pipeline.
    settings = run_settings(kafka_broker, tiny_bundle, names, batch_size=4, queue_batches=1)
    stats = StreamMonitor(settings, detector=det).run(idle_exit_s=3.0)
    assert (stats.messages, stats.frames, stats.dead_letters) == (21, 20, 1)
    (dead,) = read_all(kafka_broker, names["dlq"], 1)
    headers = dict(dead.headers)
    assert headers["sdns-error"].startswith(b"scoring failed: RuntimeError: model bug")
    assert int(headers["sdns-source-offset"]) == 7
    assert len(read_json(kafka_broker, names["scores"], 20)) == 20


class _SlowDetector(Detector):
    """A model slower than the consumer (as a large encoder on a CPU is)."""

    def anomaly_scores(self, prepared: np.ndarray) -> np.ndarray:
        time.sleep(0.03)
        return super().anomaly_scores(prepared)


@pytest.mark.integration
def test_the_pipeline_never_holds_more_than_queue_batches(
    kafka_broker: Broker, tiny_bundle: Path, fashion_test: np.ndarray
) -> None:
    names = topics(kafka_broker, "frames", "scores")
    produce(kafka_broker, names["frames"], [png(image) for image in fashion_test[:400]])
    settings = run_settings(kafka_broker, tiny_bundle, names, batch_size=8, queue_batches=3)
    det = _SlowDetector(Detector.load(tiny_bundle, device="cpu").bundle, device="cpu")
    monitor = StreamMonitor(settings, detector=det)
    seen: list[int] = []
    sampler_stop = threading.Event()

    def sample() -> None:
        while not sampler_stop.is_set():
            seen.append(len(monitor.inflight))
            time.sleep(0.001)

    sampler = threading.Thread(target=sample)
    sampler.start()
    try:
        stats = monitor.run(idle_exit_s=3.0)
    finally:
        sampler_stop.set()
        sampler.join()
    assert stats.frames == 400
    assert max(seen) == 3  # the slow model filled the pipeline; the consumer paused there
    offsets = _offsets(read_json(kafka_broker, names["scores"], 400))
    assert set(offsets.values()) == {1} and len(offsets) == 400


def _run_cli(broker: Broker, bundle: Path, names: dict[str, str], *extra: str) -> Any:
    command, env = run_command(broker, bundle, names, *extra)
    proc = subprocess.Popen(command, env=env, stderr=subprocess.PIPE, text=True)
    return proc, LineReader(proc)


def _offsets(scores: list[dict]) -> Counter[tuple[int, int]]:
    return Counter((s["source"]["partition"], s["source"]["offset"]) for s in scores)


@pytest.mark.integration
def test_two_processes_of_one_group_split_the_partitions(
    kafka_broker: Broker, tiny_bundle: Path, fashion_test: np.ndarray
) -> None:
    names = topics(kafka_broker, "frames", "alerts", "scores", partitions=4)
    procs = [_run_cli(kafka_broker, tiny_bundle, names) for _ in range(2)]
    try:
        # Both have joined once each holds two of the four partitions.
        for _, log in procs:
            wait_for(
                lambda log=log: log.find(r"assigned (\S+\[\d\](, )?){2}$"),
                90,
                "an assignment of two partitions\n" + log.text(),
            )
        frames = [png(image) for image in fashion_test[2400:2440]]
        from kafka import KafkaProducer

        producer = KafkaProducer(bootstrap_servers=kafka_broker.bootstrap_servers)
        for i, value in enumerate(frames):
            producer.send(names["frames"], key=b"cam%d" % (i % 4), value=value, partition=i % 4)
        producer.flush()
        producer.close()
        scores = read_json(kafka_broker, names["scores"], 40, timeout_ms=30000)
        for proc, _ in procs:
            proc.send_signal(signal.SIGTERM)
        for proc, _ in procs:
            assert proc.wait(timeout=30) == 0
    finally:
        for proc, _ in procs:
            proc.kill()
    assert len(scores) == 40 and set(_offsets(scores).values()) == {1}  # every frame once
    counts = [int(log.find(r"stopped: (\d+) messages")[0].group(1)) for _, log in procs]
    assert sum(counts) == 40 and min(counts) > 0, counts


@pytest.mark.integration
def test_sigkill_mid_stream_then_restart_loses_no_frame(
    kafka_broker: Broker, tiny_bundle: Path, fashion_test: np.ndarray
) -> None:
    n, batch = 600, 16
    names = topics(kafka_broker, "frames", "alerts", "scores")
    produce(kafka_broker, names["frames"], [png(image) for image in fashion_test[:n]])
    options = ("--batch-size", str(batch))
    proc, _ = _run_cli(kafka_broker, tiny_bundle, names, *options)
    try:
        consumer = KafkaConsumer(
            names["scores"],
            bootstrap_servers=kafka_broker.bootstrap_servers,
            auto_offset_reset="earliest",
            group_id=None,
            consumer_timeout_ms=60000,
        )
        for seen, _ in enumerate(consumer, 1):  # kill once a third of the stream was scored
            if seen >= n // 3:
                break
        consumer.close()
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        proc.kill()
    first = read_json(kafka_broker, names["scores"], n, timeout_ms=3000)
    assert n // 3 <= len(first) < n, "the kill came too late to test anything"

    proc, _ = _run_cli(kafka_broker, tiny_bundle, names, *options)
    try:
        scores = read_json(kafka_broker, names["scores"], n + 10 * batch, timeout_ms=15000)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 0
    finally:
        proc.kill()
    offsets = _offsets(scores)
    assert set(offsets) == {(0, o) for o in range(n)}  # every input offset scored
    duplicates = sum(offsets.values()) - n
    # Only what was scored but not committed when the process died is scored again.
    assert duplicates <= 4 * batch, duplicates
    print(f"SIGKILL after {len(first)} scores: {duplicates} duplicates (batch size {batch})")
