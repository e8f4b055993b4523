"""Soak test of `sdns-monitor run`: a steady stream for many minutes, watched from outside.

The real CLI runs as a subprocess against the embedded broker (Tansu) while this script produces
frames at a fixed rate: Fashion-MNIST test images (in-distribution), some MNIST digits
(out-of-distribution), and every `--bad-every`-th message a bad one (random bytes, a truncated
PNG, an empty value, a PNG header that claims 100000 x 100000 pixels, an .npy of object dtype),
so the dead-letter path works the whole time. Every `--sample-s` seconds it reads the process's
RSS (VmRSS), open file descriptors, threads and CPU time from /proc, and frames scored and dead
letters from its /metrics.

At the end it checks that nothing was lost: every good frame has a record in the scores topic
(distinct offsets), every bad one is in the dead-letter topic, the group's committed offsets
reach every offset the producer had acknowledged, and SIGTERM stops `run` with exit code 0.
Growth after the warm-up (RSS slope by least squares, fds, threads) and throughput per interval
are printed as a markdown table and written as JSON, with a verdict against the thresholds
below: flat, levelling off (RSS grew over the window but not over its later half) or growing.

    make soak [MINUTES=12]
    python benchmarks/soak.py [--minutes 12] [--rate 150] [--model BUNDLE]
                              [--out benchmarks/results/soak.json]

Exit status: 1 if frames were lost, offsets were left uncommitted or `run` died (or did not exit
0 on SIGTERM); the growth verdict is reported, never failed on. Without --model it uses the
demo's cached quick model (runs/demo/model.sdns) or fits it there first (about 2 minutes).
"""

from __future__ import annotations

import argparse
import io
import json
import os
import platform
import shutil
import signal
import struct
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
import uuid
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from sdns_monitor.broker import Broker, free_port, start_broker

DEMO_MODEL = Path("runs/demo/model.sdns")
BAD_KINDS = ("random-bytes", "truncated-png", "empty", "bomb-png-header", "npy-object")
# Verdict thresholds (after the warm-up); the figures are reported, never failed on.
RSS_SLOPE_LIMIT_MIB_PER_10MIN = 20.0
FD_GROWTH_LIMIT = 2
THREAD_GROWTH_LIMIT = 2
TANSU_ENV = {"SDNS_SESSION_TIMEOUT_MS": "6000", "SDNS_HEARTBEAT_INTERVAL_MS": "1000"}


# ---------------------------------------------------------------------------- model and frames
def obtain_model(given: Path | None) -> tuple[Path, str]:
    """The bundle to soak: --model, else the demo's cached quick model, fitted if missing."""
    if given is not None:
        return given, "given"
    from sdns_monitor.bundle import load_bundle
    from sdns_monitor.errors import BundleError

    try:
        load_bundle(DEMO_MODEL)
        return DEMO_MODEL, "demo cache (quick)"
    except BundleError:
        pass
    # As `sdns-monitor demo` does it, into the same cache, so that either reuses the other's.
    from sdns_monitor.cli import fit

    shutil.rmtree(DEMO_MODEL, ignore_errors=True)
    print(f"fitting the quick recipe on fashion-mnist:train into {DEMO_MODEL}", flush=True)
    fit(data="fashion-mnist:train", out=DEMO_MODEL, recipe="quick")
    return DEMO_MODEL, "quick, fitted now"


def _png(image: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(image[..., 0]).save(buf, format="PNG")
    return buf.getvalue()


def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def bomb_png(side: int = 100_000) -> bytes:
    """A valid PNG header claiming side x side grey pixels, with almost no pixel data."""
    ihdr = struct.pack(">IIBBBBB", side, side, 8, 0, 0, 0, 0)
    idat = zlib.compress(b"\x00" * 64)
    return (
        b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", ihdr) + _chunk(b"IDAT", idat) + _chunk(b"IEND", b"")
    )


def bad_frame(kind: str, good: bytes, rng: np.random.Generator) -> bytes:
    if kind == "random-bytes":
        return b"\x00" + rng.bytes(300)  # the leading zero: never a magic number by chance
    if kind == "truncated-png":
        return good[: len(good) // 2]
    if kind == "empty":
        return b""
    if kind == "bomb-png-header":
        return bomb_png()
    if kind == "npy-object":
        buf = io.BytesIO()
        np.save(buf, np.array([{"a": 1}, None], dtype=object), allow_pickle=True)
        return buf.getvalue()
    raise ValueError(kind)


@dataclass
class FramePool:
    fashion: list[bytes]
    mnist: list[bytes]

    @classmethod
    def load(cls, n_fashion: int = 2000, n_mnist: int = 500) -> FramePool:
        from sdns_monitor.data import load_dataset

        fashion = load_dataset("fashion-mnist:test", size=28, channels=1).images[:n_fashion]
        mnist = load_dataset("mnist:test", size=28, channels=1).images[:n_mnist]
        return cls([_png(x) for x in fashion], [_png(x) for x in mnist])


# ---------------------------------------------------------------------------- producing
@dataclass
class Produced:
    """What the producer got acknowledged: (partition, offset) of good and of bad messages."""

    good: set[tuple[int, int]] = field(default_factory=set)
    bad: dict[tuple[int, int], str] = field(default_factory=dict)
    sent: int = 0
    errors: list[str] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)
    started: float = 0.0
    finished: float = 0.0
    max_behind_s: float = 0.0  # how far the producer fell behind its schedule

    def acked(self) -> int:
        with self.lock:
            return len(self.good) + len(self.bad)


def produce_steady(
    broker: Broker,
    topic: str,
    pool: FramePool,
    rate: float,
    seconds: float,
    bad_every: int,
    ood_fraction: float,
    out: Produced,
    stop: threading.Event,
) -> None:
    """Send `rate` messages per second for `seconds`, recording the offsets. Four cameras
    (keys camera-0..3), camera N on partition N % partitions: with two partitions, the default
    partitioner would put all four keys on one of them."""
    from kafka import KafkaProducer

    rng = np.random.default_rng(0)
    producer = KafkaProducer(bootstrap_servers=broker.bootstrap_servers, linger_ms=5, acks="all")

    def ok(kind: str, meta: Any) -> None:
        with out.lock:
            if kind == "good":
                out.good.add((meta.partition, meta.offset))
            else:
                out.bad[(meta.partition, meta.offset)] = kind

    def failed(exc: BaseException) -> None:
        with out.lock:
            out.errors.append(f"{type(exc).__name__}: {exc}")

    partitions = len(producer.partitions_for(topic))
    total = int(rate * seconds)
    out.started = t0 = time.monotonic()
    for i in range(total):
        if stop.is_set():
            break
        delay = t0 + i / rate - time.monotonic()
        if delay > 0:
            time.sleep(delay)
        else:
            out.max_behind_s = max(out.max_behind_s, -delay)
        good = pool.fashion[i % len(pool.fashion)]
        headers = [("content-type", b"image/png")]
        if (i + 1) % bad_every == 0:
            kind = BAD_KINDS[(i // bad_every) % len(BAD_KINDS)]
            value = bad_frame(kind, good, rng)
            headers = [("content-type", b"image/png")] if "png" in kind else []
        elif rng.random() < ood_fraction:
            kind, value = "good", pool.mnist[i % len(pool.mnist)]
        else:
            kind, value = "good", good
        # Bad messages rotate over the keys too, so that every partition gets its share.
        camera = (i // bad_every if kind != "good" else i) % 4
        future = producer.send(
            topic,
            key=b"camera-%d" % camera,
            value=value,
            headers=headers,
            partition=camera % partitions,
        )
        future.add_callback(ok, kind)
        future.add_errback(failed)
        out.sent += 1
    producer.flush()
    producer.close()
    out.finished = time.monotonic()


# ---------------------------------------------------------------------------- watching run
def run_command() -> list[str]:
    """The installed console script next to this interpreter, else the module."""
    script = Path(sys.executable).parent / "sdns-monitor"
    return [str(script)] if script.exists() else [sys.executable, "-m", "sdns_monitor.cli"]


def proc_status(pid: int) -> dict[str, float]:
    """RSS, peak RSS and RSS split in anonymous and file-backed memory (MiB), threads, open
    fds and CPU seconds of a live process."""
    out: dict[str, float] = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        name, _, value = line.partition(":")
        if name in ("VmRSS", "VmHWM", "RssAnon", "RssFile"):
            out[name] = int(value.split()[0]) / 1024
        elif name == "Threads":
            out["threads"] = int(value)
    out["fds"] = len(os.listdir(f"/proc/{pid}/fd"))
    # utime and stime are fields 14 and 15; the command name (field 2) may hold spaces.
    stat = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    out["cpu_s"] = (int(stat[11]) + int(stat[12])) / os.sysconf("SC_CLK_TCK")
    return out


def http_get(url: str, timeout: float = 5.0) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()


def scrape(port: int) -> dict[str, float] | None:
    """Totals of the counters and gauges the soak follows, or None if /metrics did not answer."""
    from prometheus_client.parser import text_string_to_metric_families

    try:
        status, text = http_get(f"http://127.0.0.1:{port}/metrics")
    except OSError:
        return None
    if status != 200:
        return None
    wanted = {
        "sdns_messages_total": "messages",
        "sdns_frames_total": "frames",
        "sdns_dead_letters_total": "dead_letters",
        "sdns_flagged_frames_total": "flagged",
        "sdns_alerts_total": "alerts",
        "sdns_output_failures_total": "output_failures",
        "sdns_consumer_lag": "lag",
        "sdns_ready": "ready",
    }
    out = dict.fromkeys(wanted.values(), 0.0)
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name in wanted:
                out[wanted[sample.name]] += sample.value
    return out


def wait_ready(proc: subprocess.Popen[bytes], port: int, timeout: float) -> float:
    """Seconds until /readyz answers 200; raises if `run` exits or never gets there."""
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        if proc.poll() is not None:
            raise RuntimeError(f"`run` exited with code {proc.returncode} while starting")
        try:
            if http_get(f"http://127.0.0.1:{port}/readyz", 2.0)[0] == 200:
                return time.monotonic() - t0
        except OSError:
            pass
        time.sleep(0.5)
    raise RuntimeError(f"`run` was not ready within {timeout:.0f} s")


# ---------------------------------------------------------------------------- reading back
def read_topic(bootstrap: str, topic: str, timeout_s: float = 120.0) -> list[Any]:
    """Every record of `topic`, from the beginning to its end as of now.

    The end is the larger of ListOffsets (`end_offsets`) and the high watermark of fetch
    responses: Tansu answers ListOffsets with the first offset of the partition's last batch
    plus one, short of the end when that batch held several records."""
    from kafka import KafkaConsumer, TopicPartition

    consumer = KafkaConsumer(
        bootstrap_servers=bootstrap, group_id=None, enable_auto_commit=False, max_poll_records=5000
    )
    try:
        parts = [TopicPartition(topic, p) for p in sorted(consumer.partitions_for_topic(topic))]
        consumer.assign(parts)
        consumer.seek_to_beginning(*parts)
        listed = consumer.end_offsets(parts)
        out: list[Any] = []
        deadline = time.monotonic() + timeout_s
        while True:
            if time.monotonic() > deadline:
                raise RuntimeError(f"reading {topic} back took longer than {timeout_s:.0f} s")
            got = consumer.poll(timeout_ms=1000)
            for records in got.values():
                out.extend(records)
            highwater = {tp: consumer.highwater(tp) for tp in parts}
            if not got and all(
                hw is not None and consumer.position(tp) >= max(hw, listed[tp])
                for tp, hw in highwater.items()
            ):
                return out
    finally:
        consumer.close()


def committed(bootstrap: str, group: str, topic: str) -> dict[int, int]:
    """partition -> the offset `group` committed (0 when none)."""
    from kafka import KafkaConsumer, TopicPartition

    consumer = KafkaConsumer(bootstrap_servers=bootstrap, group_id=group, enable_auto_commit=False)
    try:
        parts = [TopicPartition(topic, p) for p in sorted(consumer.partitions_for_topic(topic))]
        return {tp.partition: consumer.committed(tp) or 0 for tp in parts}
    finally:
        consumer.close()


def produced_ends(produced: Produced) -> dict[int, int]:
    """partition -> one past the last offset the producer had acknowledged there."""
    ends: dict[int, int] = {}
    with produced.lock:
        for partition, offset in [*produced.good, *produced.bad]:
            ends[partition] = max(ends.get(partition, 0), offset + 1)
    return ends


def behind(committed_offsets: dict[int, int], ends: dict[int, int]) -> int:
    """Messages produced but not committed, over all partitions."""
    return sum(max(end - committed_offsets.get(p, 0), 0) for p, end in ends.items())


# ---------------------------------------------------------------------------- analysis
def machine() -> dict[str, Any]:
    model = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {
        "cores": os.cpu_count(),
        "cpu": model,
        "platform": platform.platform(),
        "python": platform.python_version(),
    }


def growth(samples: list[dict[str, Any]], warmup_s: float) -> dict[str, Any] | None:
    """RSS, fd and thread growth and throughput per interval, after the warm-up (None with
    fewer than 3 samples there)."""
    steady = [s for s in samples if s["t_s"] >= warmup_s]
    if len(steady) < 3:
        return None
    t = np.array([s["t_s"] for s in steady])
    rss = np.array([s["rss_mib"] for s in steady])
    slope_per_s = float(np.polyfit(t, rss, 1)[0])
    half = len(t) // 2  # the later half: has a growth that began in the warm-up levelled off?
    late_slope_per_s = float(np.polyfit(t[half:], rss[half:], 1)[0])
    rates = np.array([s["frames_per_s"] for s in steady if s["frames_per_s"] is not None])
    if len(rates) == 0:
        rates = np.array([np.nan])  # /metrics never answered
    fds = [s["fds"] for s in steady]
    threads = [s["threads"] for s in steady]
    cpu = [s["cpu_percent"] for s in steady if s["cpu_percent"] is not None]
    lag = [s["lag"] for s in steady if s["lag"] is not None]
    out = {
        "samples": len(steady),
        "from_s": float(t[0]),
        "to_s": float(t[-1]),
        "rss_mib_first": float(rss[0]),
        "rss_mib_last": float(rss[-1]),
        "rss_mib_min": float(rss.min()),
        "rss_mib_max": float(rss.max()),
        "rss_slope_mib_per_10min": slope_per_s * 600,
        "rss_slope_later_half_mib_per_10min": late_slope_per_s * 600,
        "rss_later_half_from_s": float(t[half]),
        "rss_first_vs_last_mib": float(rss[-1] - rss[0]),
        "rss_anon_mib_first_last": [steady[0]["rss_anon_mib"], steady[-1]["rss_anon_mib"]],
        "rss_file_mib_first_last": [steady[0]["rss_file_mib"], steady[-1]["rss_file_mib"]],
        "fds_first": fds[0],
        "fds_last": fds[-1],
        "fds_max": max(fds),
        "fd_growth": fds[-1] - fds[0],
        "threads_first": threads[0],
        "threads_last": threads[-1],
        "threads_max": max(threads),
        "thread_growth": threads[-1] - threads[0],
        "throughput_frames_per_s_mean": float(rates.mean()),
        "throughput_frames_per_s_min": float(rates.min()),
        "throughput_frames_per_s_max": float(rates.max()),
        "throughput_cv": float(rates.std() / max(rates.mean(), 1e-9)),
        "cpu_percent_mean": float(np.mean(cpu)) if cpu else None,
        "consumer_lag_max": max(lag) if lag else None,
    }
    rss_flat = out["rss_slope_mib_per_10min"] < RSS_SLOPE_LIMIT_MIB_PER_10MIN
    rss_levelled = out["rss_slope_later_half_mib_per_10min"] < RSS_SLOPE_LIMIT_MIB_PER_10MIN
    fd_flat = out["fd_growth"] <= FD_GROWTH_LIMIT
    thread_flat = out["thread_growth"] <= THREAD_GROWTH_LIMIT
    out["verdict"] = {
        # levelling off: grew over the window, but no longer over its later half
        "rss": "flat" if rss_flat else "levelling off" if rss_levelled else "growing",
        "fds": "flat" if fd_flat else "growing",
        "threads": "flat" if thread_flat else "growing",
        "overall": (
            "growing"
            if not (rss_flat or rss_levelled) or not fd_flat or not thread_flat
            else "flat"
            if rss_flat
            else "levelling off"
        ),
        "thresholds": {
            "rss_slope_mib_per_10min_below": RSS_SLOPE_LIMIT_MIB_PER_10MIN,
            "fd_growth_at_most": FD_GROWTH_LIMIT,
            "thread_growth_at_most": THREAD_GROWTH_LIMIT,
        },
    }
    return out


def log_stats(path: Path, seconds: float) -> dict[str, Any]:
    """How chatty `run` was: lines, warnings and errors, lines per minute, the commonest."""
    lines = path.read_text(errors="replace").splitlines()
    warnings = [line for line in lines if " WARNING " in line]
    errors = [line for line in lines if " ERROR " in line or "Traceback" in line]
    kinds: dict[str, int] = {}
    for line in lines:
        # "2026-01-01 12:00:00,123 LEVEL message": grouped by level and the first words
        parts = line.split(" ", 3)
        logged = len(parts) == 4 and parts[1][:2].isdigit() and parts[1][2:3] == ":"
        key = " ".join([parts[2], *parts[3].split()[:3]]) if logged else "(not a log line)"
        kinds[key] = kinds.get(key, 0) + 1
    common = sorted(kinds.items(), key=lambda kv: -kv[1])[:8]
    return {
        "lines": len(lines),
        "warnings": len(warnings),
        "errors": len(errors),
        "lines_per_minute": len(lines) / max(seconds / 60, 1e-9),
        "commonest": [{"start": k, "count": n} for k, n in common],
        "first_errors": errors[:5],
    }


# ---------------------------------------------------------------------------- main
def main() -> int:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--minutes", type=float, default=12.0, help="how long the stream runs")
    ap.add_argument("--rate", type=float, default=150.0, help="messages per second")
    ap.add_argument("--warmup-minutes", type=float, default=2.0, help="left out of the growth")
    ap.add_argument("--sample-s", type=float, default=10.0, help="seconds between samples")
    ap.add_argument("--bad-every", type=int, default=50, help="every Nth message is bad")
    ap.add_argument("--ood-fraction", type=float, default=0.1, help="MNIST among good frames")
    ap.add_argument("--partitions", type=int, default=2, help="of the frames topic")
    ap.add_argument("--model", type=Path, default=None, help="bundle (default: the demo's)")
    ap.add_argument("--workdir", type=Path, default=None, help="logs (default: a temp dir)")
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results/soak.json"))
    args = ap.parse_args()
    warmup_s = args.warmup_minutes * 60
    if args.minutes * 60 <= warmup_s + 3 * args.sample_s:
        warmup_s = args.minutes * 60 / 3  # a short smoke run still has something to fit
        print(f"short run: warm-up taken as {warmup_s:.0f} s", flush=True)

    model, model_source = obtain_model(args.model)
    print("encoding frames (Fashion-MNIST test, MNIST test)", flush=True)
    pool = FramePool.load()
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="sdns-soak-"))
    workdir.mkdir(parents=True, exist_ok=True)
    run_log = workdir / "run.log"
    loadavg_start = os.getloadavg()

    from kafka import KafkaAdminClient
    from kafka.admin import NewTopic

    with start_broker(log=workdir / "tansu.log") as broker:
        run_id = uuid.uuid4().hex[:8]
        names = {n: f"soak-{n}-{run_id}" for n in ("frames", "scores", "alerts", "dlq")}
        admin = KafkaAdminClient(bootstrap_servers=broker.bootstrap_servers)
        admin.create_topics(
            [NewTopic(t, args.partitions if n == "frames" else 1, 1) for n, t in names.items()]
        )
        admin.close()
        group = f"soak-{run_id}"
        port = free_port()
        cmd = [
            *run_command(),
            "run",
            "--topic",
            names["frames"],
            "--model",
            str(model),
            "--bootstrap-servers",
            broker.bootstrap_servers,
            "--group-id",
            group,
            "--scores-topic",
            names["scores"],
            "--alert-topic",
            names["alerts"],
            "--dlq-topic",
            names["dlq"],
            "--from-beginning",
            "--metrics-host",
            "127.0.0.1",
            "--metrics-port",
            str(port),
        ]
        print(f"broker {broker.bootstrap_servers}; logs in {workdir}", flush=True)
        print("$ " + " ".join(cmd), flush=True)
        with run_log.open("wb") as log_file:
            proc = subprocess.Popen(
                cmd, env={**os.environ, **TANSU_ENV}, stdout=log_file, stderr=subprocess.STDOUT
            )
        try:
            result = soak(args, broker, names, group, port, proc, pool, warmup_s)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        result["run_log"] = log_stats(run_log, result["seconds_streamed"])
        result["run_log"]["path"] = str(run_log)
    result.update(
        {
            "command": cmd,
            "model": {"path": str(model), "source": model_source},
            "machine": {
                **machine(),
                "loadavg_start": loadavg_start,
                "loadavg_end": os.getloadavg(),
            },
            "settings": {
                "minutes": args.minutes,
                "rate": args.rate,
                "warmup_s": warmup_s,
                "sample_s": args.sample_s,
                "bad_every": args.bad_every,
                "ood_fraction": args.ood_fraction,
                "partitions": args.partitions,
            },
        }
    )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(table(result))
    print(f"\nwrote {args.out}")
    if result["problems"]:
        print("FAILED: " + "; ".join(result["problems"]), file=sys.stderr)
        return 1
    return 0


def soak(
    args: argparse.Namespace,
    broker: Broker,
    names: dict[str, str],
    group: str,
    port: int,
    proc: subprocess.Popen[bytes],
    pool: FramePool,
    warmup_s: float,
) -> dict[str, Any]:
    """Stream, sample, drain, stop and check; returns the measurements and the problems."""
    problems: list[str] = []
    ready_s = wait_ready(proc, port, 180)
    print(
        f"`run` (pid {proc.pid}) ready after {ready_s:.1f} s; streaming {args.rate:g} "
        f"messages/s for {args.minutes:g} min",
        flush=True,
    )
    produced, stop = Produced(), threading.Event()
    producer = threading.Thread(
        target=produce_steady,
        args=(
            broker,
            names["frames"],
            pool,
            args.rate,
            args.minutes * 60,
            args.bad_every,
            args.ood_fraction,
            produced,
            stop,
        ),
        daemon=True,
    )
    t0 = time.monotonic()
    producer.start()
    samples: list[dict[str, Any]] = []
    last: dict[str, Any] | None = None
    next_sample = t0
    while producer.is_alive() and proc.poll() is None:
        time.sleep(max(0.0, next_sample - time.monotonic()))
        next_sample += args.sample_s
        if samples and not producer.is_alive():
            break  # an interval that ran past the stream's end would read as a slowdown
        try:
            sample = take_sample(proc.pid, port, t0, produced, last)
        except OSError:  # /proc/PID is gone: the process died
            break
        samples.append(sample)
        last = sample
        print(
            f"  t={sample['t_s']:5.0f} s  rss {sample['rss_mib']:6.1f} MiB  fds {sample['fds']:3d}"
            f"  threads {sample['threads']:3d}  {_f(sample['frames_per_s'])} frames/s  "
            f"scored {_f(sample['frames'])}  dead {_f(sample['dead_letters'])}  "
            f"lag {_f(sample['lag'])}  cpu {_f(sample['cpu_percent'])}%",
            flush=True,
        )
    streamed_s = time.monotonic() - t0
    if proc.poll() is not None:
        stop.set()
        problems.append(f"`run` died during the stream (exit code {proc.returncode})")
    producer.join()
    if produced.errors:
        problems.append(f"{len(produced.errors)} frames were not accepted by the broker")
    total = produced.acked()
    ends = produced_ends(produced)
    # Drain: everything produced is consumed, delivered and committed.
    drain_t0 = time.monotonic()
    offsets: dict[int, int] = {}
    drained = False
    while proc.poll() is None and time.monotonic() - drain_t0 < 180:
        metrics = scrape(port)
        if metrics is not None and metrics["messages"] >= total:
            offsets = committed(broker.bootstrap_servers, group, names["frames"])
            if behind(offsets, ends) == 0:
                drained = True
                break
        time.sleep(1.0)
    drain_s = time.monotonic() - drain_t0
    final = take_sample(proc.pid, port, t0, produced, last) if proc.poll() is None else None
    if not drained:
        problems.append(
            f"not drained within {drain_s:.0f} s (committed {offsets}, produced up to {ends})"
        )
    exit_code: int | None = proc.returncode
    stop_s = None
    if proc.poll() is None:
        stop_t0 = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        try:
            exit_code = proc.wait(timeout=90)
        except subprocess.TimeoutExpired:
            problems.append("`run` did not stop within 90 s of SIGTERM")
        stop_s = time.monotonic() - stop_t0
    if exit_code != 0:
        problems.append(f"`run` exit code {exit_code} (expected 0 on SIGTERM)")
    offsets_after = committed(broker.bootstrap_servers, group, names["frames"])
    uncommitted = behind(offsets_after, ends)
    if uncommitted:
        problems.append(f"{uncommitted} messages not committed after the stop")

    print("reading the scores and dead-letter topics back", flush=True)
    scored: dict[tuple[int, int], int] = {}
    for m in read_topic(broker.bootstrap_servers, names["scores"]):
        source = json.loads(m.value)["source"]
        if source["topic"] == names["frames"]:
            where = (source["partition"], source["offset"])
            scored[where] = scored.get(where, 0) + 1
    dead: dict[tuple[int, int], int] = {}
    dead_reasons: dict[str, int] = {}
    for m in read_topic(broker.bootstrap_servers, names["dlq"]):
        headers = dict(m.headers)
        where = (int(headers["sdns-source-partition"]), int(headers["sdns-source-offset"]))
        dead[where] = dead.get(where, 0) + 1
        kind = produced.bad.get(where, "unexpected")
        dead_reasons[kind] = dead_reasons.get(kind, 0) + 1
    lost_good = len(produced.good - scored.keys())
    lost_bad = len(produced.bad.keys() - dead.keys())
    wrongly_dead = len(produced.good & dead.keys())
    if lost_good:
        problems.append(f"{lost_good} good frames have no score record")
    if lost_bad:
        problems.append(f"{lost_bad} bad frames are missing from the dead-letter topic")
    if wrongly_dead:
        problems.append(f"{wrongly_dead} good frames went to the dead-letter topic")
    return {
        "seconds_streamed": streamed_s,
        "ready_s": ready_s,
        "drain_s": drain_s,
        "stop_s": stop_s,
        "exit_code": exit_code,
        "produced": {
            "messages": total,
            "good": len(produced.good),
            "bad": len(produced.bad),
            "rate_achieved": produced.sent / max(produced.finished - produced.started, 1e-9),
            "max_behind_schedule_s": produced.max_behind_s,
            "send_errors": produced.errors[:5],
        },
        "scored": {
            "distinct": len(scored),
            "records": sum(scored.values()),
            "duplicates": sum(scored.values()) - len(scored),
        },
        "dead_letters": {
            "distinct": len(dead),
            "records": sum(dead.values()),
            "by_kind": dead_reasons,
        },
        "lost": {
            "good_not_scored": lost_good,
            "bad_not_dead_lettered": lost_bad,
            "good_dead_lettered": wrongly_dead,
            "uncommitted": uncommitted,
        },
        "committed_vs_produced": {
            str(p): [offsets_after.get(p, 0), end] for p, end in sorted(ends.items())
        },
        "final_sample": final,
        "samples": samples,
        "growth": growth(samples, warmup_s),
        "problems": problems,
    }


def take_sample(
    pid: int, port: int, t0: float, produced: Produced, last: dict[str, Any] | None
) -> dict[str, Any]:
    now = time.monotonic()
    status = proc_status(pid)
    metrics = scrape(port)
    sample: dict[str, Any] = {
        "t_s": now - t0,
        "rss_mib": status["VmRSS"],
        "hwm_mib": status["VmHWM"],
        "rss_anon_mib": status["RssAnon"],
        "rss_file_mib": status["RssFile"],
        "fds": int(status["fds"]),
        "threads": int(status["threads"]),
        "cpu_s": status["cpu_s"],
        "produced": produced.acked(),
        "loadavg_1m": os.getloadavg()[0],
        **{
            k: (metrics or {}).get(k)
            for k in (
                "messages",
                "frames",
                "dead_letters",
                "flagged",
                "alerts",
                "output_failures",
                "lag",
            )
        },
    }
    sample["frames_per_s"] = sample["cpu_percent"] = None
    if last is not None:
        dt = sample["t_s"] - last["t_s"]
        if sample["frames"] is not None and last["frames"] is not None:
            sample["frames_per_s"] = (sample["frames"] - last["frames"]) / dt
        sample["cpu_percent"] = 100 * (sample["cpu_s"] - last["cpu_s"]) / dt
    return sample


def _f(value: float | None) -> str:
    return "-" if value is None else f"{value:.0f}"


def table(r: dict[str, Any]) -> str:
    m, p, g = r["machine"], r["produced"], r["growth"]
    s, lost = r["settings"], r["lost"]
    lines = [
        f"soak of `sdns-monitor run`: {s['minutes']:g} min at {s['rate']:g} messages/s, "
        f"every {s['bad_every']}th bad; model {r['model']['path']} ({r['model']['source']}); "
        f"{m['cpu']}, {m['cores']} cores, load average {m['loadavg_start'][0]:.1f} at the start, "
        f"{m['loadavg_end'][0]:.1f} at the end",
        "",
        "| measure | value |",
        "|---|---|",
        f"| messages produced (good / bad) | {p['messages']} ({p['good']} / {p['bad']}) |",
        f"| input rate achieved (messages/s; producer at most behind schedule) | "
        f"{p['rate_achieved']:.1f} ({p['max_behind_schedule_s']:.2f} s) |",
        f"| frames scored (distinct offsets / duplicate records) | {r['scored']['distinct']} / "
        f"{r['scored']['duplicates']} |",
        f"| dead letters (distinct / expected) | {r['dead_letters']['distinct']} / {p['bad']} |",
        f"| **lost** (good not scored / bad not dead-lettered / uncommitted) | "
        f"**{lost['good_not_scored']} / {lost['bad_not_dead_lettered']} / "
        f"{lost['uncommitted']}** |",
        f"| `run` exit code on SIGTERM (stop took) | {r['exit_code']} ({_f(r['stop_s'])} s) |",
        f"| drain after the stream (s) | {r['drain_s']:.1f} |",
    ]
    if g is not None:
        v = g["verdict"]
        lines += [
            f"| samples after warm-up ({g['from_s']:.0f}-{g['to_s']:.0f} s) | {g['samples']} |",
            f"| RSS first / last after warm-up (MiB) | {g['rss_mib_first']:.1f} / "
            f"{g['rss_mib_last']:.1f} (min {g['rss_mib_min']:.1f}, max {g['rss_mib_max']:.1f}) |",
            f"| **RSS slope** (MiB per 10 min, least squares; flat below "
            f"{RSS_SLOPE_LIMIT_MIB_PER_10MIN:g}) | **{g['rss_slope_mib_per_10min']:+.2f}: "
            f"{v['rss']}** |",
            f"| RSS slope over the later half ({g['rss_later_half_from_s']:.0f} s on; MiB per "
            f"10 min) | {g['rss_slope_later_half_mib_per_10min']:+.2f} |",
            f"| RSS last minus first (MiB) | {g['rss_first_vs_last_mib']:+.1f} (anonymous "
            f"{g['rss_anon_mib_first_last'][0]:.0f} -> {g['rss_anon_mib_first_last'][1]:.0f}, "
            f"file-backed {g['rss_file_mib_first_last'][0]:.0f} -> "
            f"{g['rss_file_mib_first_last'][1]:.0f}) |",
            f"| **open fds** first / last / max (flat: growth <= {FD_GROWTH_LIMIT}) | "
            f"**{g['fds_first']} / {g['fds_last']} / {g['fds_max']}: {v['fds']}** |",
            f"| **threads** first / last / max (flat: growth <= {THREAD_GROWTH_LIMIT}) | "
            f"**{g['threads_first']} / {g['threads_last']} / {g['threads_max']}: "
            f"{v['threads']}** |",
            f"| throughput per interval (frames/s): mean / min / max | "
            f"{g['throughput_frames_per_s_mean']:.1f} / {g['throughput_frames_per_s_min']:.1f} / "
            f"{g['throughput_frames_per_s_max']:.1f} |",
            f"| throughput coefficient of variation | {g['throughput_cv']:.3f} |",
            f"| consumer lag, max after warm-up (messages) | {_f(g['consumer_lag_max'])} |",
            f"| CPU of `run`, mean (% of one core) | {_f(g['cpu_percent_mean'])} |",
            f"| verdict | **{v['overall']}** |",
        ]
    last = r["final_sample"] or (r["samples"][-1] if r["samples"] else None)
    if last is not None:
        lines += [
            f"| peak RSS (VmHWM, MiB) | {last['hwm_mib']:.1f} |",
            f"| flagged frames / alerts / output failures (from /metrics) | "
            f"{_f(last['flagged'])} / {_f(last['alerts'])} / {_f(last['output_failures'])} |",
        ]
    log = r.get("run_log")
    if log is not None:
        lines.append(
            f"| `run` log: lines (per minute) / warnings / errors | {log['lines']} "
            f"({log['lines_per_minute']:.1f}) / {log['warnings']} / {log['errors']} |"
        )
    if r["problems"]:
        lines += ["", "problems: " + "; ".join(r["problems"])]
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
