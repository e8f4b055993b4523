"""Camera state at scale: per-frame cost against the number of cameras, restore time from the
state topic, and what writing the state costs `run` in frames/s. Each figure is a ratio of two
measurements taken side by side in this run, or an absolute figure labelled with the machine.

1. Per-frame cost of the camera test and its state, without Kafka: a batch of 64 frames is
   `snapshot`, `observe` for each frame, `silences` (silence and expiry), and `take_dirty` with
   each changed camera's state encoded as the state topic carries it. With 10, 1,000 and
   100,000 cameras, frames of random cameras -> `per_frame_100k_vs_1k_ratio` (no work
   proportional to the number of cameras: near 1; what remains is cache misses). Ten cameras
   cost less per frame because a batch touches only ten of them.
2. Restore from the state topic (embedded Tansu, which does not compact): the time
   `state.restore` takes for every partition, for 100,000 cameras with one record each (what a
   compacted topic holds) and for 10,000 cameras with 20 records each (an uncompacted
   history), against `RESTORE_S`, the bound after which a restore gives up and logs.
3. `run` frames/s through the real CLI on a backlog of frames from many cameras, with and
   without `--state-topic`, alternated -> `state_topic_frames_per_s_ratio` (with / without).

    python benchmarks/camera_state.py [--model BUNDLE] [--out benchmarks/results/camera_state.json]

Without --model it uses the demo's quick model (runs/demo/model.sdns), fitting it first if
needed (about 2 minutes).
"""

from __future__ import annotations

import argparse
import gc
import io
import json
import os
import platform
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from sdns_monitor.broker import Broker, start_broker  # noqa: E402
from sdns_monitor.records import Source  # noqa: E402
from sdns_monitor.sequential import evidence, threshold  # noqa: E402
from sdns_monitor.settings import RunSettings  # noqa: E402
from sdns_monitor.stream import state  # noqa: E402
from sdns_monitor.stream.cameras import CameraAlarms  # noqa: E402

BATCH = 64
IN_FLIGHT = 4  # batches scored but not yet delivered (run's default queue)
DEMO_MODEL = ROOT / "runs/demo/model.sdns"
TANSU_ENV = {"SDNS_SESSION_TIMEOUT_MS": "6000", "SDNS_HEARTBEAT_INTERVAL_MS": "1000"}


# ---------------------------------------------------------------------------- 1. per frame
def _alarms() -> CameraAlarms:
    return CameraAlarms(threshold(63_115_200.0), 300.0, 300.0, 86_400.0, 300.0)


def per_frame_cost(n_cameras: int, frames: int, seed: int = 0) -> dict[str, float]:
    """Microseconds per frame of the camera test alone, with its state written, and that again
    with Python's cycle collector off (what is left when its traversals of every camera's
    objects are taken out)."""
    rng = np.random.default_rng(seed)
    e = evidence(rng.uniform(size=frames))
    cameras = rng.integers(0, n_cameras, size=frames)
    keys = [f"camera-{i:06d}" for i in range(n_cameras)]
    out: dict[str, float] = {"cameras": n_cameras, "frames": frames}
    variants = (
        ("test_us_per_frame", False, True),
        ("with_state_us_per_frame", True, True),
        ("with_state_gc_off_us_per_frame", True, False),
    )
    for label, with_state, collect in variants:
        gc.collect()
        if not collect:
            gc.disable()
        try:
            out[label] = _time_batches(alarms_of(keys), keys, cameras, e, with_state)
        finally:
            gc.enable()
    return out


def alarms_of(keys: list[str]) -> CameraAlarms:
    """Camera alarms that know every camera of `keys` (one frame each)."""
    alarms = _alarms()
    for i, key in enumerate(keys):
        alarms.observe(_source(key, i % 8, 0), 0.0, now_s=0.0)
    alarms.take_dirty()
    return alarms


def _time_batches(
    alarms: CameraAlarms, keys: list[str], cameras: np.ndarray, e: np.ndarray, with_state: bool
) -> float:
    """Microseconds per frame of batches of BATCH frames of `cameras` (indices into `keys`)
    with evidence `e`; the frames' Source records are made before the clock starts."""
    offsets = np.zeros(len(keys), dtype=np.int64)
    sources = []
    for c in cameras:
        offsets[c] += 1
        sources.append(_source(keys[c], int(c) % 8, int(offsets[c])))
    frames = len(sources)
    t0 = time.perf_counter()
    in_flight: list[int] = []
    for start in range(0, frames, BATCH):
        in_flight.append(alarms.snapshot())
        for j in range(start, min(start + BATCH, frames)):
            alarms.observe(sources[j], float(e[j]), 1.0)
        alarms.silences(now_s=1.0)
        for (topic, key), _, camera in alarms.take_dirty(export=with_state):
            state.state_key(topic, key)
            if camera is not None:
                state.encode(camera)
        if len(in_flight) > IN_FLIGHT:  # the oldest delivered, as the loop settles it
            alarms.settled(in_flight.pop(0))
    return (time.perf_counter() - t0) / frames * 1e6


def _source(key: str, partition: int, offset: int) -> Source:
    return Source(
        topic="frames",
        partition=partition,
        offset=offset,
        key=key,
        key_encoding="utf-8",
        timestamp_ms=1_700_000_000_000 + offset * 500,
    )


# ---------------------------------------------------------------------------- 2. restore
def _admin_topics(broker: Broker, partitions: dict[str, int]) -> dict[str, str]:
    from kafka import KafkaAdminClient
    from kafka.admin import NewTopic

    run_id = uuid.uuid4().hex[:8]
    names = {n: f"{n}-{run_id}" for n in partitions}
    admin = KafkaAdminClient(bootstrap_servers=broker.bootstrap_servers)
    admin.create_topics([NewTopic(names[n], p, 1) for n, p in partitions.items()])
    admin.close()
    return names


def restore_time(
    broker: Broker, cameras: int, records_each: int, partitions: int
) -> dict[str, Any]:
    """Write `records_each` states of each of `cameras` cameras, then time a full restore."""
    from kafka import KafkaProducer

    names = _admin_topics(broker, {"state": partitions})
    template = _alarms()
    template.observe(_source("x", 0, 0), 0.0, now_s=0.0)
    ((_, _, camera),) = template.take_dirty()
    assert camera is not None
    producer = KafkaProducer(
        bootstrap_servers=broker.bootstrap_servers, linger_ms=20, batch_size=1 << 20
    )
    t0 = time.perf_counter()
    for round_ in range(records_each):
        for i in range(cameras):
            key, partition = f"camera-{i:06d}", i % partitions
            value = {**camera, "key": key, "partition": partition, "offset": round_}
            producer.send(
                names["state"],
                key=state.state_key("frames", key),
                value=state.encode(value),
                partition=partition,
            )
    producer.flush()
    producer.close()
    write_s = time.perf_counter() - t0
    settings = RunSettings(
        topic=["frames"],
        model="unused.sdns",
        bootstrap_servers=broker.bootstrap_servers,
        state_topic=names["state"],
    )
    t0 = time.perf_counter()
    restored, _ = state.restore(settings, {("frames", p) for p in range(partitions)})
    seconds = time.perf_counter() - t0
    records = cameras * records_each
    assert len(restored) == cameras, f"restored {len(restored)} of {cameras} cameras"
    assert all(s["offset"] == records_each - 1 for s in restored)  # the latest of each
    return {
        "cameras": cameras,
        "records_each": records_each,
        "records": records,
        "partitions": partitions,
        "write_s": write_s,
        "restore_s": seconds,
        "records_per_s": records / seconds,
        "records_within_bound": int(records / seconds * state.RESTORE_S),
    }


# ---------------------------------------------------------------------------- 3. run
def _png(image: np.ndarray) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format="PNG")
    return buf.getvalue()


def run_rate(
    broker: Broker, model: Path, values: list[bytes], cameras: int, with_state: bool
) -> dict[str, Any]:
    """Frames/s of `run` scoring a backlog (first to last score record, broker timestamps)."""
    from kafka import KafkaConsumer, KafkaProducer

    kinds = {"frames": 2, "scores": 2, "alerts": 1, "state": 2}
    names = _admin_topics(broker, kinds)
    producer = KafkaProducer(bootstrap_servers=broker.bootstrap_servers, linger_ms=5)
    for i, value in enumerate(values):
        producer.send(names["frames"], key=b"camera-%d" % (i % cameras), value=value)
    producer.flush()
    producer.close()
    cmd = [
        *_run_command(),
        "run",
        "--topic",
        names["frames"],
        "--model",
        str(model),
        "--bootstrap-servers",
        broker.bootstrap_servers,
        "--group-id",
        f"g-{names['frames']}",
        "--scores-topic",
        names["scores"],
        "--alert-topic",
        names["alerts"],
        "--from-beginning",
        "--metrics-port",
        "off",
        *(("--state-topic", names["state"]) if with_state else ()),
    ]
    proc = subprocess.Popen(
        cmd,
        env={**os.environ, **TANSU_ENV},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        consumer = KafkaConsumer(
            names["scores"],
            bootstrap_servers=broker.bootstrap_servers,
            group_id=None,
            auto_offset_reset="earliest",
            consumer_timeout_ms=180_000,
        )
        written = []
        for m in consumer:
            written.append(m.timestamp)
            if len(written) >= len(values):
                break
        consumer.close()
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=60)
    assert len(written) == len(values), f"{len(written)} of {len(values)} frames scored"
    span_s = (max(written) - min(written)) / 1000
    return {"with_state": with_state, "frames_per_s": (len(values) - 1) / span_s}


def _run_command() -> list[str]:
    script = Path(sys.executable).parent / "sdns-monitor"
    return [str(script)] if script.exists() else [sys.executable, "-m", "sdns_monitor.cli"]


def _model(given: Path | None) -> Path:
    if given is not None:
        return given
    if not (DEMO_MODEL / "manifest.json").exists():
        from trainer.config import make_config
        from trainer.fit import fit

        print(f"fitting the quick recipe on fashion-mnist:train into {DEMO_MODEL}", flush=True)
        fit("fashion-mnist:train", DEMO_MODEL, make_config("quick"), device="cpu")
    return DEMO_MODEL


# ---------------------------------------------------------------------------- main
def main() -> int:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--model", type=Path, default=None)
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results/camera_state.json"))
    ap.add_argument("--frames", type=int, default=200_000, help="per camera count (part 1)")
    ap.add_argument("--run-frames", type=int, default=6000, help="backlog scored by run")
    ap.add_argument("--run-cameras", type=int, default=500, help="cameras of that backlog")
    ap.add_argument("--repeats", type=int, default=2, help="run with and without, alternated")
    args = ap.parse_args()
    started = time.perf_counter()
    results: dict[str, Any] = {
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores",
        "loadavg_start": os.getloadavg(),
    }
    print("1. per-frame cost against the number of cameras", flush=True)
    results["per_frame"] = [per_frame_cost(n, args.frames) for n in (10, 1_000, 100_000)]
    _, thousand, large = results["per_frame"]
    results["per_frame_100k_vs_1k_ratio"] = (
        large["with_state_us_per_frame"] / thousand["with_state_us_per_frame"]
    )
    with start_broker(log=Path(tempfile.mkdtemp(prefix="sdns-state-")) / "tansu.log") as broker:
        print("2. restore from the state topic", flush=True)
        results["restore"] = [
            restore_time(broker, 100_000, 1, 6),
            restore_time(broker, 10_000, 20, 6),
        ]
        print("3. run with and without the state topic", flush=True)
        from sdns_monitor.data import load_dataset

        model = _model(args.model)
        images = load_dataset("fashion-mnist:test").images[: args.run_frames]
        values = [_png(im[..., 0] if im.shape[-1] == 1 else im) for im in images]
        runs = []
        for _ in range(args.repeats):
            for with_state in (False, True):
                runs.append(run_rate(broker, model, values, args.run_cameras, with_state))
                print(f"   {runs[-1]}", flush=True)
    without = [r["frames_per_s"] for r in runs if not r["with_state"]]
    with_ = [r["frames_per_s"] for r in runs if r["with_state"]]
    results["run"] = {
        "runs": runs,
        "frames": args.run_frames,
        "cameras": args.run_cameras,
        "model": str(model),
        "without_state_frames_per_s": float(np.median(without)),
        "with_state_frames_per_s": float(np.median(with_)),
    }
    results["state_topic_frames_per_s_ratio"] = float(np.median(with_) / np.median(without))
    results["loadavg_end"] = os.getloadavg()
    results["wall_seconds"] = time.perf_counter() - started
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2) + "\n")
    print(table(results))
    print(f"\nwrote {args.out}")
    return 0


def table(r: dict[str, Any]) -> str:
    lines = [
        f"camera state ({r['machine']}; load average {r['loadavg_start'][0]:.1f} at the start)",
        "",
        "| cameras | test alone (us/frame) | with its state encoded (us/frame) |",
        "|---|---|---|",
    ]
    for p in r["per_frame"]:
        lines.append(
            f"| {p['cameras']:,} | {p['test_us_per_frame']:.1f} | "
            f"{p['with_state_us_per_frame']:.1f} |"
        )
    lines += [
        f"\nper frame, 100,000 cameras vs 1,000: {r['per_frame_100k_vs_1k_ratio']:.2f}x (a "
        "batch of 64 frames touches 64 cameras in both; with 10 cameras it touches 10, hence "
        "fewer undo copies and state records per frame)",
        "",
        f"| restore: cameras x records each | records | seconds | records/s | within "
        f"{state.RESTORE_S:.0f} s |",
        "|---|---|---|---|---|",
    ]
    for x in r["restore"]:
        lines.append(
            f"| {x['cameras']:,} x {x['records_each']} | {x['records']:,} | "
            f"{x['restore_s']:.1f} | {x['records_per_s']:,.0f} | {x['records_within_bound']:,} |"
        )
    run = r["run"]
    lines += [
        "",
        f"run on a backlog of {run['frames']:,} frames from {run['cameras']} cameras (median of "
        f"{len(run['runs']) // 2}): without the state topic "
        f"{run['without_state_frames_per_s']:.0f} frames/s, with it "
        f"{run['with_state_frames_per_s']:.0f} (ratio {r['state_topic_frames_per_s_ratio']:.2f})",
    ]
    return "\n".join(lines)


if __name__ == "__main__":
    raise SystemExit(main())
