"""Faults against the real broker: `run` killed with SIGKILL at random points, many times."""

from __future__ import annotations

import json
import random
import signal
import subprocess
import threading
import time
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from kafka import KafkaProducer

from sdns_monitor.broker import Broker
from tests.integration.kafka_helpers import noise, png, read_all, run_command, topics


def _start(
    broker: Broker, bundle: Path, names: dict[str, str], batch: int
) -> subprocess.Popen[bytes]:
    extra = ("--batch-size", str(batch), "--incident-cooldown-s", "0")
    command, env = run_command(broker, bundle, names, *extra)
    return subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


@pytest.mark.integration
@pytest.mark.slow
def test_twenty_sigkills_of_a_steady_stream_lose_nothing(
    kafka_broker: Broker, tiny_bundle: Path, fashion_test: np.ndarray
) -> None:
    rounds, batch, rate = 20, 16, 150.0
    names = topics(kafka_broker, "frames", "alerts", "scores", partitions=2)
    ood_every = 10  # every tenth frame is noise: out of distribution, always flagged
    frames = [
        png(noise(1, seed=i)[0]) if i % ood_every == 0 else png(fashion_test[i % 3000])
        for i in range(20000)  # longer than the kill rounds: every kill hits a busy stream
    ]
    sent: list[tuple[int, int, bool]] = []  # partition, offset, out of distribution
    stop = threading.Event()

    def steady() -> None:
        producer = KafkaProducer(bootstrap_servers=kafka_broker.bootstrap_servers, linger_ms=5)
        for i, value in enumerate(frames):
            if stop.is_set():
                break
            meta = producer.send(names["frames"], key=b"cam%d" % (i % 4), value=value).get(10)
            sent.append((meta.partition, meta.offset, i % ood_every == 0))
            time.sleep(1 / rate)
        producer.close()

    producer = threading.Thread(target=steady)
    producer.start()
    rng = random.Random(0)
    try:
        for _ in range(rounds):
            proc = _start(kafka_broker, tiny_bundle, names, batch)
            time.sleep(rng.uniform(3.0, 8.0))  # start-up takes about 3 s: some die early
            proc.send_signal(signal.SIGKILL)
            proc.wait(timeout=30)
    finally:
        stop.set()
        producer.join()
    proc = _start(kafka_broker, tiny_bundle, names, batch)  # the last one finishes the stream
    try:
        expected = len(sent)
        deadline = time.monotonic() + 300
        scores: list[dict] = []
        while time.monotonic() < deadline:
            scores = [
                json.loads(m.value) for m in read_all(kafka_broker, names["scores"], 10**9, 3000)
            ]
            if len({(s["source"]["partition"], s["source"]["offset"]) for s in scores}) >= expected:
                break
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=60) == 0
    finally:
        proc.kill()
    scored = Counter((s["source"]["partition"], s["source"]["offset"]) for s in scores)
    missing = [(p, o) for p, o, _ in sent if (p, o) not in scored]
    assert not missing, f"{len(missing)} frames never scored, e.g. {missing[:5]}"
    alerts = {
        (a["source"]["partition"], a["source"]["offset"])
        for a in (json.loads(m.value) for m in read_all(kafka_broker, names["alerts"], 10**9, 3000))
        if a.get("kind") == "alert"
    }
    # With no cooldown, every flagged frame must have its alert, whichever process scored it.
    flagged = {(s["source"]["partition"], s["source"]["offset"]) for s in scores if s["flagged"]}
    assert flagged <= alerts, f"{len(flagged - alerts)} flagged frames without an alert"
    ood = {(p, o) for p, o, is_ood in sent if is_ood}
    assert len(ood & flagged) >= 0.9 * len(ood)  # noise is flagged (a random encoder misses a few)
    duplicates = sum(scored.values()) - len(scored)
    # Only batches in flight at a kill are scored again: at most queue_batches (4) batches of
    # `batch` messages per round.
    assert duplicates <= rounds * 4 * batch, duplicates
    print(
        f"{rounds} SIGKILLs, {expected} frames: 0 lost, {duplicates} duplicates "
        f"({duplicates / rounds:.1f} per kill, batch {batch})"
    )
