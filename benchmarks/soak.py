"""Soak test of `sdns-monitor run`: a steady stream for many minutes, watched from outside.

The real CLI runs as a subprocess against the embedded broker (Tansu) while this script produces
frames at a fixed rate: Fashion-MNIST test images (in-distribution), some MNIST digits
(out-of-distribution), and every `--bad-every`-th message a bad one (random bytes, a truncated
PNG, an empty value, a PNG header that claims 100000 x 100000 pixels, an .npy of object dtype),
so the dead-letter path works the whole time. Every `--sample-s` seconds it reads the process's
RSS (VmRSS), open file descriptors, threads and CPU time from /proc, and frames scored and dead
letters from its /metrics. With `--burst-every-s`, it also sends `--burst-messages` at once that
often: backlog episodes on a quiet machine, as a busy one makes them by chance.

Memory, to tell a leak from the allocator keeping freed memory: every sample splits RSS by kind
of mapping (/proc/PID/smaps: the main malloc arena's [heap], the thread arenas' 64 MiB heaps,
other anonymous memory, files), and `run` writes a report every 30 s (SDNS_MEMORY_REPORT_DIR,
sdns_monitor/stream/memory.py): what glibc's malloc holds in use and free, per arena, and with
`--tracemalloc N` the Python-level allocations. `--env NAME=VALUE` sets `run`'s environment
(e.g. SDNS_MALLOC_TRIM_S=0 turns the trimming off, MALLOC_ARENA_MAX=2), `--allocator jemalloc`
preloads libjemalloc (`apt-get install libjemalloc2`), `--label` names the configuration.

At the end it checks that nothing was lost: every good frame has a record in the scores topic
(distinct offsets), every bad one is in the dead-letter topic, the group's committed offsets
reach every offset the producer had acknowledged, and SIGTERM stops `run` with exit code 0.
Growth after the warm-up (RSS slope by least squares, fds, threads) and throughput per interval
are printed as a markdown table and written as JSON, with a verdict against the thresholds
below: flat, levelling off (RSS grew over the window but not over its later half) or growing.

    make soak [MINUTES=12]
    python benchmarks/soak.py [--minutes 12] [--rate 150] [--model BUNDLE]
                              [--out benchmarks/results/soak.json]
    python benchmarks/soak.py --minutes 10 --label no-trim --env SDNS_MALLOC_TRIM_S=0 \
                              --burst-every-s 60 --out benchmarks/results/soak-no-trim.json

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
JEMALLOC = (
    "/usr/lib/x86_64-linux-gnu/libjemalloc.so.2",
    "/usr/lib/aarch64-linux-gnu/libjemalloc.so.2",
)
ARENA_HEAP = 64 * 1024 * 1024  # glibc's HEAP_MAX_SIZE (64-bit): a thread arena's heaps


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
    burst_sent: int = 0  # of `sent`, in bursts
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
    burst_every_s: float = 0.0,
    burst_messages: int = 0,
) -> None:
    """Send `rate` messages per second for `seconds`, recording the offsets. Four cameras
    (keys camera-0..3), camera N on partition N % partitions: with two partitions, the default
    partitioner would put all four keys on one of them. With `burst_every_s`, also
    `burst_messages` good frames at once that often (the first after one interval)."""
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

    def send(camera: int, kind: str, value: bytes, headers: list[tuple[str, bytes]]) -> None:
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

    partitions = len(producer.partitions_for(topic))
    total = int(rate * seconds)
    out.started = t0 = time.monotonic()
    next_burst = t0 + burst_every_s if burst_every_s > 0 and burst_messages > 0 else float("inf")
    for i in range(total):
        if stop.is_set():
            break
        delay = t0 + i / rate - time.monotonic()
        if delay > 0:
            time.sleep(delay)
        else:
            out.max_behind_s = max(out.max_behind_s, -delay)
        if time.monotonic() >= next_burst:
            next_burst += burst_every_s
            for j in range(burst_messages):
                frame = pool.fashion[(i + j) % len(pool.fashion)]
                send(j % 4, "good", frame, [("content-type", b"image/png")])
                out.burst_sent += 1
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
        send(camera, kind, value, headers)
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


def smaps_split(pid: int) -> dict[str, float]:
    """RSS of a live process by kind of mapping (MiB), from /proc/PID/smaps: `heap_main` is the
    main malloc arena ([heap], grown with brk); `heap_arenas` the heaps of glibc's thread arenas
    (anonymous mappings inside a 64 MiB block that one of them starts at its aligned start: a
    heuristic; the reports `run` writes have the exact per-arena sizes); `anon_other` the rest
    of the anonymous memory (blocks malloc mmaps one by one, thread stacks, torch's and
    jemalloc's own mappings); `file` file-backed pages."""
    out = {"heap_main": 0.0, "heap_arenas": 0.0, "anon_other": 0.0, "file": 0.0}
    vmas: list[list[Any]] = []  # start, end, path, rss, anonymous
    for line in Path(f"/proc/{pid}/smaps").read_text().splitlines():
        head = line.split(maxsplit=5)
        if len(head) >= 5 and "-" in head[0] and ":" not in head[0]:
            lo, hi = (int(x, 16) for x in head[0].split("-"))
            vmas.append([lo, hi, head[5].strip() if len(head) > 5 else "", 0.0, 0.0])
        elif head and head[0] in ("Rss:", "Anonymous:") and vmas:
            vmas[-1][3 if head[0] == "Rss:" else 4] += int(head[1]) / 1024
    block = (-1, -1)  # the 64 MiB block of the thread-arena heap being walked
    for lo, hi, path, rss, anon in vmas:
        if path == "[heap]":
            out["heap_main"] += rss
        elif path and not path.startswith("["):
            out["file"] += rss - anon
            out["anon_other"] += anon  # private copies of file pages (relocations, .bss)
        elif path:  # [stack], [vdso], ...
            out["anon_other"] += rss
        else:
            if lo % ARENA_HEAP == 0 and hi - lo <= ARENA_HEAP:
                block = (lo, lo + ARENA_HEAP)  # a heap starts with its heap_info, aligned
            inside = block[0] <= lo and hi <= block[1]
            out["heap_arenas" if inside else "anon_other"] += rss
    return out


def read_memory_reports(folder: Path) -> list[dict[str, Any]]:
    """The reports `run` wrote (sdns_monitor/stream/memory.py), oldest first."""
    return [json.loads(p.read_text()) for p in sorted(folder.glob("memory-*.json"))]


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
        # where the RSS is (smaps_split), MiB per 10 min and first -> last
        "by_mapping": {
            key: {
                "slope_mib_per_10min": _slope([s[key] for s in steady], t),
                "first_last": [steady[0][key], steady[-1][key]],
            }
            for key in ("rss_anon_mib", *(f"{k}_mib" for k in SPLIT_KEYS))
            if all(key in s for s in steady)
        },
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


SPLIT_KEYS = ("heap_main", "heap_arenas", "anon_other", "file")


def _slope(values: list[float], t: np.ndarray) -> float:
    """Least-squares slope in units per 10 minutes."""
    return float(np.polyfit(t, np.asarray(values, dtype=float), 1)[0]) * 600


def memory_growth(
    reports: list[dict[str, Any]], t0_wall: float, warmup_s: float
) -> dict[str, Any] | None:
    """What `run`'s own reports say after the warm-up: malloc's bytes in use and free, arenas,
    trims, and (with --tracemalloc) Python-level memory and the sites that grew most."""
    for r in reports:
        r["soak_t_s"] = r["time"] - t0_wall
    steady = [r for r in reports if r["soak_t_s"] >= warmup_s]
    if len(steady) < 3:
        return None
    t = np.array([r["soak_t_s"] for r in steady])
    first, last = steady[0], steady[-1]
    out: dict[str, Any] = {
        "reports": len(steady),
        "rss_mib_first_last": [first["rss_mib"], last["rss_mib"]],
        "upkeep": last["upkeep"],
    }
    if all(r["heap"] for r in steady):
        for key in ("heaps", "in_use", "free", "mmapped"):
            out[f"malloc_{key}_mib"] = {
                "first_last": [first["heap"][key], last["heap"][key]],
                "slope_mib_per_10min": _slope([r["heap"][key] for r in steady], t),
            }
    if all(r["arenas"] is not None for r in steady):
        out["arenas_first_last"] = [len(first["arenas"]), len(last["arenas"])]
        out["arenas_last"] = last["arenas"]
    if all("gc" in r for r in steady):
        # collections and objects found in reference cycles, per generation, over the window
        out["gc_after_warmup"] = [
            {
                "collections": b["collections"] - a["collections"],
                "collected": b["collected"] - a["collected"],
            }
            for a, b in zip(first["gc"], last["gc"], strict=True)
        ]
    if all("python" in r for r in steady):
        out["python_traced_mib"] = {
            "first_last": [first["python"]["traced_mib"], last["python"]["traced_mib"]],
            "slope_mib_per_10min": _slope([r["python"]["traced_mib"] for r in steady], t),
        }
        before = {x["site"]: x["mib"] for x in first["python"]["top"]}
        after = {x["site"]: x["mib"] for x in last["python"]["top"]}
        grew = sorted(
            ((site, after.get(site, 0.0) - before.get(site, 0.0)) for site in {*before, *after}),
            key=lambda kv: -abs(kv[1]),
        )
        out["python_sites_changed_mib"] = [{"site": k, "mib": v} for k, v in grew[:10]]
        out["python_top_last"] = last["python"]["top"][:10]
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


def _module_dir() -> str:
    """Where the sdns_monitor that `run` imports lives (PYTHONPATH may point at a copy)."""
    import sdns_monitor

    return str(Path(sdns_monitor.__file__).parent)


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
    ap.add_argument("--label", default="default", help="names the configuration in the report")
    ap.add_argument(
        "--env", action="append", default=[], metavar="NAME=VALUE", help="for `run` (repeatable)"
    )
    ap.add_argument("--allocator", choices=("glibc", "jemalloc"), default="glibc")
    ap.add_argument("--tracemalloc", type=int, default=0, metavar="FRAMES", help="in `run`")
    ap.add_argument("--burst-every-s", type=float, default=0.0, help="backlog episodes")
    ap.add_argument("--burst-messages", type=int, default=1500, help="per burst")
    ap.add_argument(
        "--no-state",
        dest="state",
        action="store_false",
        help="run without the camera-state topic (deploy/ sets one; on by default here)",
    )
    args = ap.parse_args()
    child_env = dict(item.split("=", 1) for item in args.env)
    if args.allocator == "jemalloc":
        found = [p for p in JEMALLOC if Path(p).exists()]
        if not found:
            ap.error(
                "--allocator jemalloc: libjemalloc.so.2 not found (apt-get install libjemalloc2)"
            )
        child_env["LD_PRELOAD"] = found[0]
    if args.tracemalloc:
        child_env["SDNS_TRACEMALLOC"] = str(args.tracemalloc)
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
        kinds = ("frames", "scores", "alerts", "dlq", *(("state",) if args.state else ()))
        names = {n: f"soak-{n}-{run_id}" for n in kinds}
        co_partitioned = ("frames", "state")  # the state topic has the input's partitions
        admin = KafkaAdminClient(bootstrap_servers=broker.bootstrap_servers)
        admin.create_topics(
            [
                NewTopic(t, args.partitions if n in co_partitioned else 1, 1)
                for n, t in names.items()
            ]
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
            *(("--state-topic", names["state"]) if args.state else ()),
        ]
        print(f"broker {broker.bootstrap_servers}; logs in {workdir}", flush=True)
        print("$ " + " ".join(cmd), flush=True)
        with run_log.open("wb") as log_file:
            reports = workdir / "memory"
            env = {**os.environ, **TANSU_ENV, "SDNS_MEMORY_REPORT_DIR": str(reports), **child_env}
            proc = subprocess.Popen(cmd, env=env, stdout=log_file, stderr=subprocess.STDOUT)
        try:
            result = soak(args, broker, names, group, port, proc, pool, warmup_s)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        result["memory"] = memory_growth(read_memory_reports(reports), result["t0_wall"], warmup_s)
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
                "label": args.label,
                "child_env": child_env,
                "burst_every_s": args.burst_every_s,
                "burst_messages": args.burst_messages,
                "state_topic": args.state,
                "sdns_monitor_from": _module_dir(),
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
            args.burst_every_s,
            args.burst_messages,
        ),
        daemon=True,
    )
    t0, t0_wall = time.monotonic(), time.time()
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
            f"  t={sample['t_s']:5.0f} s  rss {sample['rss_mib']:6.1f} MiB (heap "
            f"{sample['heap_main_mib']:.0f} arenas {sample['heap_arenas_mib']:.0f} anon "
            f"{sample['anon_other_mib']:.0f})  fds {sample['fds']:3d}"
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
    state_records = (
        len(read_topic(broker.bootstrap_servers, names["state"])) if "state" in names else None
    )
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
        "t0_wall": t0_wall,
        "ready_s": ready_s,
        "drain_s": drain_s,
        "stop_s": stop_s,
        "exit_code": exit_code,
        "produced": {
            "messages": total,
            "good": len(produced.good),
            "bad": len(produced.bad),
            "rate_achieved": produced.sent / max(produced.finished - produced.started, 1e-9),
            "in_bursts": produced.burst_sent,
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
        "state_records": state_records,
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
    split = smaps_split(pid)
    metrics = scrape(port)
    sample: dict[str, Any] = {
        "t_s": now - t0,
        "rss_mib": status["VmRSS"],
        "hwm_mib": status["VmHWM"],
        "rss_anon_mib": status["RssAnon"],
        "rss_file_mib": status["RssFile"],
        **{f"{k}_mib": v for k, v in split.items()},
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


def _env_text(s: dict[str, Any]) -> str:
    given = [f"{k}={v}" for k, v in s["child_env"].items()]
    return " ".join(given) if given else "defaults"


def _burst_text(s: dict[str, Any]) -> str:
    if not s["burst_every_s"] or not s["burst_messages"]:
        return ""
    return f" plus {s['burst_messages']} at once every {s['burst_every_s']:g} s"


def _by_mapping_rows(g: dict[str, Any]) -> list[str]:
    rows = []
    names = {
        "heap_main_mib": "main arena [heap]",
        "heap_arenas_mib": "thread arenas' heaps",
        "anon_other_mib": "other anonymous",
        "file_mib": "file-backed",
    }
    for key, name in names.items():
        m = g.get("by_mapping", {}).get(key)
        if m is not None:
            rows.append(
                f"| RSS in {name} (MiB first -> last; slope per 10 min) | "
                f"{m['first_last'][0]:.0f} -> {m['first_last'][1]:.0f}; "
                f"{m['slope_mib_per_10min']:+.1f} |"
            )
    return rows


def _memory_rows(m: dict[str, Any] | None) -> list[str]:
    if m is None:
        return []
    rows = []
    for key, name in (("in_use", "in use"), ("free", "free"), ("mmapped", "mmapped one by one")):
        x = m.get(f"malloc_{key}_mib")
        if x is not None:
            rows.append(
                f"| malloc: {name} (MiB first -> last; slope per 10 min) | "
                f"{x['first_last'][0]:.0f} -> {x['first_last'][1]:.0f}; "
                f"{x['slope_mib_per_10min']:+.1f} |"
            )
    if "arenas_first_last" in m:
        a = m["arenas_first_last"]
        rows.append(f"| malloc arenas first / last | {a[0]} / {a[1]} |")
    u = m["upkeep"]
    rows.append(
        f"| trims (every {u['trim_every_s']:g} s) / RSS they released / time in them | "
        f"{u['trims']} / {u['trim_released_mib']:.0f} MiB / {u['trim_seconds']:.2f} s |"
    )
    if "gc_after_warmup" in m:
        per_gen = ", ".join(f"{g['collected']} in {g['collections']}" for g in m["gc_after_warmup"])
        rows.append(f"| objects freed by the cycle collector (gen 0, 1, 2) | {per_gen} |")
    py = m.get("python_traced_mib")
    if py is not None:
        rows.append(
            f"| Python-level memory, tracemalloc (MiB first -> last; slope per 10 min) | "
            f"{py['first_last'][0]:.1f} -> {py['first_last'][1]:.1f}; "
            f"{py['slope_mib_per_10min']:+.2f} |"
        )
    return rows


def _f(value: float | None) -> str:
    return "-" if value is None else f"{value:.0f}"


def table(r: dict[str, Any]) -> str:
    m, p, g = r["machine"], r["produced"], r["growth"]
    s, lost = r["settings"], r["lost"]
    lines = [
        f"soak of `sdns-monitor run` ({s['label']}: {_env_text(s)}): {s['minutes']:g} min at "
        f"{s['rate']:g} messages/s{_burst_text(s)}, every {s['bad_every']}th bad; model {r['model']['path']} ({r['model']['source']}); "
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
        f"| camera-state records written (state topic) | {_f(r.get('state_records'))} |",
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
            *_by_mapping_rows(g),
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
            *_memory_rows(r.get("memory")),
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
