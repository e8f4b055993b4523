"""`run`'s memory upkeep: hand the memory glibc's allocator holds free back to the system, and
(for diagnosis) report what the allocator and Python hold.

glibc's malloc gives threads that contend for it arenas of their own (up to 8 per core) and
returns memory to the system only from the top of a heap. `run` allocates messages, decoded
frames and tensors of varying size on the decoder threads, the scorer thread and Kafka's I/O
thread, so after a backlog the heaps keep the free memory they needed at its peak: in a
10-minute soak with backlogs (benchmarks/soak.py), malloc held 40-90 MiB free and RSS grew by
as much, while what was in use grew by under 10 MiB; fewer arenas (MALLOC_ARENA_MAX=2) only
moved that growth into the main heap. `malloc_trim(0)` releases the free pages of every arena,
the middle of a heap included (tens of milliseconds); `upkeep()` runs it every `TRIM_EVERY_S`
on a thread of its own, so that RSS follows what is in use. Where the C library is not glibc
(musl, macOS), everything here is a no-op; with jemalloc preloaded, the trim touches only
glibc's unused arenas.

Environment (read once, when `upkeep()` starts):

    SDNS_MALLOC_TRIM_S=60          seconds between trims; 0 turns trimming off
    SDNS_MEMORY_REPORT_DIR=DIR     write a JSON report every REPORT_EVERY_S (benchmarks/soak.py
                                   reads them): glibc's per-arena sizes, trims and what they
                                   freed, the cyclic garbage collector's counts
    SDNS_TRACEMALLOC=N             with the above: trace Python allocations (N frames each) and
                                   add the largest allocation sites to each report

>>> with upkeep():
...     loop()
"""

from __future__ import annotations

import contextlib
import ctypes
import gc
import json
import logging
import os
import re
import sys
import tempfile
import threading
import time
import tracemalloc
from collections.abc import Iterator, Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

log = logging.getLogger("sdns_monitor.stream")

TRIM_EVERY_S = 60.0  # a trim of run's heaps took 10-40 ms in the soaks
REPORT_EVERY_S = 30.0
TOP_SITES = 25  # allocation sites per tracemalloc report
MIB = 1024 * 1024


class _Mallinfo2(ctypes.Structure):
    _fields_ = [
        (name, ctypes.c_size_t)
        for name in (
            "arena",  # bytes the heaps (brk and mmap'd arena heaps) hold from the system
            "ordblks",
            "smblks",
            "hblks",
            "hblkhd",  # bytes in chunks mmap'd one by one (large allocations)
            "usmblks",
            "fsmblks",
            "uordblks",  # bytes in use in the heaps
            "fordblks",  # bytes free in the heaps
            "keepcost",
        )
    ]


def _glibc() -> Any:
    """The C library when it is glibc with malloc_trim, else None."""
    if not sys.platform.startswith("linux") or not os.confstr_names.get("CS_GNU_LIBC_VERSION"):
        return None
    try:
        if not os.confstr("CS_GNU_LIBC_VERSION"):
            return None
        libc = ctypes.CDLL(None)
        libc.malloc_trim.argtypes = [ctypes.c_size_t]
        return libc
    except (OSError, AttributeError, ValueError):
        return None


_LIBC = _glibc()


def trim() -> bool | None:
    """Return the free memory of every malloc arena to the system (glibc's `malloc_trim(0)`).
    True if some was released, False if none was, None where this is not glibc."""
    if _LIBC is None:
        return None
    return bool(_LIBC.malloc_trim(0))


@dataclass(frozen=True)
class HeapUsage:
    """What glibc's malloc holds, over all arenas (MiB)."""

    heaps: float  # taken from the system for arenas' heaps
    in_use: float  # allocated in them
    free: float  # free in them: what trimming can give back
    mmapped: float  # large allocations, each in its own mapping (returned on free)


def heap_usage() -> HeapUsage | None:
    """glibc's `mallinfo2()`, in MiB; None elsewhere (or before glibc 2.33)."""
    if _LIBC is None or not hasattr(_LIBC, "mallinfo2"):
        return None
    _LIBC.mallinfo2.restype = _Mallinfo2
    m = _LIBC.mallinfo2()
    return HeapUsage(m.arena / MIB, m.uordblks / MIB, m.fordblks / MIB, m.hblkhd / MIB)


def arenas() -> list[dict[str, float]] | None:
    """Per arena, from glibc's `malloc_info()`: MiB taken from the system and MiB free in it."""
    if _LIBC is None or not hasattr(_LIBC, "malloc_info"):
        return None
    _LIBC.fopen.restype = ctypes.c_void_p
    _LIBC.fopen.argtypes = [ctypes.c_char_p, ctypes.c_char_p]
    _LIBC.malloc_info.argtypes = [ctypes.c_int, ctypes.c_void_p]
    _LIBC.fclose.argtypes = [ctypes.c_void_p]
    with tempfile.NamedTemporaryFile(suffix=".xml") as tmp:
        stream = _LIBC.fopen(tmp.name.encode(), b"w")
        if not stream:
            return None
        _LIBC.malloc_info(0, stream)
        _LIBC.fclose(stream)
        xml = Path(tmp.name).read_text()
    out = []
    for heap in re.findall(r'<heap nr="\d+">(.*?)</heap>', xml, re.S):
        free = sum(
            int(s)
            for s in re.findall(r'<total type="(?:fast|rest)" count="\d+" size="(\d+)"', heap)
        )
        system = re.search(r'<system type="current" size="(\d+)"', heap)
        out.append(
            {"system_mib": int(system.group(1)) / MIB if system else 0.0, "free_mib": free / MIB}
        )
    return out


def _number(env: Mapping[str, str], name: str, default: float) -> float:
    raw = env.get(name)
    if raw is None or raw == "":
        return default
    try:
        return max(float(raw), 0.0)
    except ValueError:
        log.warning("%s=%r is not a number; using %g", name, raw, default)
        return default


def _rss_mib() -> float:
    try:
        pages = int(Path("/proc/self/statm").read_text().split()[1])
    except (OSError, IndexError, ValueError):
        return 0.0
    return pages * os.sysconf("SC_PAGE_SIZE") / MIB


@dataclass
class Upkeep:
    """The settings of `upkeep()` (from the environment) and what it did."""

    trim_every_s: float = TRIM_EVERY_S
    report_dir: Path | None = None
    tracemalloc_frames: int = 0
    trims: int = 0
    trim_released_mib: float = 0.0  # RSS before minus after, summed over the trims
    trim_seconds: float = 0.0  # time spent trimming, summed
    reports: int = 0

    @classmethod
    def from_env(cls, env: Mapping[str, str]) -> Upkeep:
        """The SDNS_MALLOC_TRIM_S, SDNS_MEMORY_REPORT_DIR and SDNS_TRACEMALLOC settings; a
        value that does not parse is logged and left at its default."""
        out = cls()
        out.trim_every_s = _number(env, "SDNS_MALLOC_TRIM_S", TRIM_EVERY_S)
        out.tracemalloc_frames = int(_number(env, "SDNS_TRACEMALLOC", 0))
        if env.get("SDNS_MEMORY_REPORT_DIR"):
            out.report_dir = Path(env["SDNS_MEMORY_REPORT_DIR"])
        return out

    def trim_now(self) -> None:
        t0, before = time.perf_counter(), _rss_mib()
        if trim() is None:
            return
        self.trims += 1
        self.trim_released_mib += max(before - _rss_mib(), 0.0)
        self.trim_seconds += time.perf_counter() - t0

    def report(self, t_s: float) -> None:
        """Write one report into `report_dir`."""
        assert self.report_dir is not None
        usage = heap_usage()
        out: dict[str, Any] = {
            "pid": os.getpid(),
            "t_s": t_s,
            "time": time.time(),
            "rss_mib": _rss_mib(),
            "heap": None if usage is None else asdict(usage),
            "arenas": arenas(),
            # per generation, since start: collections, and objects found unreachable (cycles)
            "gc": gc.get_stats(),
            "upkeep": asdict(self) | {"report_dir": str(self.report_dir)},
        }
        if tracemalloc.is_tracing():
            current, peak = tracemalloc.get_traced_memory()
            snapshot = tracemalloc.take_snapshot().filter_traces(
                [tracemalloc.Filter(False, tracemalloc.__file__)]
            )
            out["python"] = {
                "traced_mib": current / MIB,
                "peak_mib": peak / MIB,
                "top": [
                    {"site": str(s.traceback), "mib": s.size / MIB, "count": s.count}
                    for s in snapshot.statistics("lineno")[:TOP_SITES]
                ],
            }
        self.report_dir.mkdir(parents=True, exist_ok=True)
        path = self.report_dir / f"memory-{os.getpid()}-{self.reports:04d}.json"
        partial = path.with_suffix(".partial")
        partial.write_text(json.dumps(out, indent=1) + "\n")
        partial.replace(path)  # readers never see half a report
        self.reports += 1


@contextlib.contextmanager
def upkeep(env: Mapping[str, str] | None = None) -> Iterator[Upkeep]:
    """Trim (and report, if asked) on a thread of its own while the block runs."""
    state = Upkeep.from_env(os.environ if env is None else env)
    if not state.trim_every_s and state.report_dir is None:
        yield state
        return
    traced = bool(state.report_dir and state.tracemalloc_frames and not tracemalloc.is_tracing())
    if traced:
        tracemalloc.start(state.tracemalloc_frames)
    stop = threading.Event()
    thread = threading.Thread(target=_work, args=(state, stop), name="sdns-memory", daemon=True)
    thread.start()
    try:
        yield state
    finally:
        stop.set()
        thread.join(10)
        if traced:
            tracemalloc.stop()
        if state.trims:
            log.info(
                "memory: %d trims released %.0f MiB in %.2f s",
                state.trims,
                state.trim_released_mib,
                state.trim_seconds,
            )


def _work(state: Upkeep, stop: threading.Event) -> None:
    t0 = time.monotonic()
    next_trim = t0 + state.trim_every_s if state.trim_every_s else float("inf")
    next_report = t0 if state.report_dir is not None else float("inf")
    while not stop.wait(max(min(next_trim, next_report) - time.monotonic(), 0.0)):
        now = time.monotonic()
        try:
            if now >= next_trim:
                state.trim_now()
                next_trim = now + state.trim_every_s
            if now >= next_report:
                state.report(now - t0)
                next_report = now + REPORT_EVERY_S
        except Exception:  # upkeep must never take `run` down; it is not needed to score
            log.exception("memory upkeep failed; trimming and reports stop")
            return
