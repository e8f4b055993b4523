"""Memory upkeep: trimming returns freed heap memory to the system; its settings come from the
environment; it reports what malloc and Python hold; without glibc it does nothing."""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from sdns_monitor.stream import memory

glibc_only = pytest.mark.skipif(memory._LIBC is None, reason="needs glibc's malloc")


def _wait_for(condition: Callable[[], bool], timeout: float = 5.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.01)
    return False


@glibc_only
def test_trim_returns_the_free_pages_of_a_fragmented_heap_to_the_system() -> None:
    # 64 MiB in 4 KiB blocks allocated on a thread of its own (its own arena, as the decoder
    # threads of run have), then freed but every 64th: the survivors pin the heap, so free()
    # alone cannot shrink it.
    blocks: list[bytes] = []
    worker = threading.Thread(target=lambda: blocks.extend(bytes(4096) for _ in range(16384)))
    worker.start()
    worker.join()
    survivors = blocks[::64]
    blocks.clear()
    held = memory.heap_usage()
    before = memory._rss_mib()
    assert memory.trim() is True
    after = memory._rss_mib()
    assert held is not None and held.free > 40  # MiB free inside the heaps, before the trim
    assert before - after > 40  # and given back by the trim
    assert len(survivors) == 256


@glibc_only
def test_heap_usage_and_arenas_describe_the_allocator() -> None:
    usage = memory.heap_usage()
    arenas = memory.arenas()
    assert usage is not None and usage.in_use > 0 and usage.free >= 0
    assert arenas and all(a["system_mib"] >= a["free_mib"] >= 0 for a in arenas)


def test_settings_come_from_the_environment(caplog: pytest.LogCaptureFixture) -> None:
    default = memory.Upkeep.from_env({})
    assert default.trim_every_s == memory.TRIM_EVERY_S
    assert default.report_dir is None and default.tracemalloc_frames == 0
    given = memory.Upkeep.from_env(
        {"SDNS_MALLOC_TRIM_S": "0", "SDNS_MEMORY_REPORT_DIR": "/tmp/x", "SDNS_TRACEMALLOC": "3"}
    )
    assert (given.trim_every_s, given.report_dir, given.tracemalloc_frames) == (
        0.0,
        Path("/tmp/x"),
        3,
    )
    with caplog.at_level(logging.WARNING, logger="sdns_monitor.stream"):
        wrong = memory.Upkeep.from_env({"SDNS_MALLOC_TRIM_S": "often"})
    assert wrong.trim_every_s == memory.TRIM_EVERY_S
    assert "SDNS_MALLOC_TRIM_S='often' is not a number" in caplog.text


def test_upkeep_trims_periodically_while_its_block_runs(monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[float] = []

    def trim() -> bool:
        calls.append(time.monotonic())
        return True

    monkeypatch.setattr(memory, "trim", trim)
    with memory.upkeep({"SDNS_MALLOC_TRIM_S": "0.01"}) as state:
        assert _wait_for(lambda: len(calls) >= 3)
    done = len(calls)
    time.sleep(0.05)
    assert len(calls) == done  # the thread stopped with the block
    assert state.trims == done
    assert not any(t.name == "sdns-memory" for t in threading.enumerate())


def test_upkeep_with_trimming_off_and_no_reports_starts_no_thread(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(memory, "trim", lambda: pytest.fail("trimmed although turned off"))
    with memory.upkeep({"SDNS_MALLOC_TRIM_S": "0"}):
        assert not any(t.name == "sdns-memory" for t in threading.enumerate())


def test_reports_say_what_malloc_and_python_hold(tmp_path: Path) -> None:
    env = {
        "SDNS_MALLOC_TRIM_S": "0",
        "SDNS_MEMORY_REPORT_DIR": str(tmp_path),
        "SDNS_TRACEMALLOC": "1",
    }
    with memory.upkeep(env):
        assert _wait_for(lambda: any(tmp_path.glob("memory-*.json")))
    report = json.loads(next(iter(sorted(tmp_path.glob("memory-*.json")))).read_text())
    assert report["rss_mib"] > 0
    assert report["python"]["traced_mib"] >= 0 and isinstance(report["python"]["top"], list)
    if memory._LIBC is not None:
        assert report["heap"]["in_use"] > 0 and report["arenas"]


def test_without_glibc_everything_is_a_no_op(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(memory, "_LIBC", None)
    assert memory.trim() is None
    assert memory.heap_usage() is None and memory.arenas() is None
    with memory.upkeep({"SDNS_MALLOC_TRIM_S": "0.01"}) as state:
        time.sleep(0.05)
    assert state.trims == 0
