"""Hot reload: requests from signal handlers, retries of a bundle that failed to load."""

from __future__ import annotations

import subprocess
import sys
import textwrap
import time
from pathlib import Path
from typing import Any

import pytest

from sdns_monitor.settings import RunSettings
from sdns_monitor.stream import reload
from sdns_monitor.stream.reload import Reloader
from sdns_monitor.stream.routing import Models
from tests.sdns_monitor.stream.fakes import Detector

# The loop calls poll() all the time; SIGHUP's handler calls request() in the same thread,
# between any two bytecodes of poll(). If request() took a lock that poll() holds, the
# handler would wait for the loop, which waits for the handler: a deadlock.
_SIGNAL_STORM = textwrap.dedent(
    """
    import signal
    from sdns_monitor.settings import RunSettings
    from sdns_monitor.stream.reload import Reloader

    def refuse(path):
        raise OSError("no bundle here")

    settings = RunSettings(topic=["t"], model="absent.sdns", metrics_port=None, reload_check_s=0)
    reloader = Reloader(settings, refuse)
    signal.signal(signal.SIGALRM, lambda *_: reloader.request())
    signal.setitimer(signal.ITIMER_REAL, 0.0001, 0.0001)
    for _ in range(100_000):
        reloader.poll(None)
    signal.setitimer(signal.ITIMER_REAL, 0)
    reloader.close()
    print("survived")
    """
)


def test_reload_requests_from_a_signal_handler_never_deadlock_the_loop() -> None:
    try:
        done = subprocess.run(
            [sys.executable, "-c", _SIGNAL_STORM], capture_output=True, text=True, timeout=60
        )
    except subprocess.TimeoutExpired:
        raise AssertionError("the loop deadlocked on a reload request from a signal") from None
    assert done.returncode == 0 and done.stdout.strip() == "survived", done.stderr[-2000:]


def _settings(model: Path) -> RunSettings:
    return RunSettings(topic=["t"], model=model, metrics_port=None, reload_check_s=0.01)


def _poll_until(reloader: Reloader, want: type, timeout: float = 5.0) -> object:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        got = reloader.poll(None)  # type: ignore[arg-type]
        if isinstance(got, want):
            return got
        time.sleep(0.01)
    raise AssertionError(f"no {want.__name__} from the reloader within {timeout} s")


def test_a_bundle_that_failed_to_load_is_tried_again_and_the_error_is_returned(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(reload, "RETRY_S", (0.05, 0.2))
    bundle = tmp_path / "cam.sdns"
    bundle.mkdir()
    (bundle / "manifest.json").write_text("{}")
    attempts: list[Path] = []

    def load(path: Path) -> Any:
        attempts.append(path)
        if len(attempts) == 1:  # the manifest was copied before the other files
            raise RuntimeError("encoder.safetensors is missing")
        return Detector()

    reloader = Reloader(_settings(bundle), load)
    time.sleep(0.02)
    (bundle / "manifest.json").write_text('{"v": 2}')  # a new bundle arrives
    error = _poll_until(reloader, Exception)
    assert "encoder.safetensors is missing" in str(error)  # returned, never raised
    loaded = _poll_until(reloader, Models)  # tried again after the backoff, unchanged files
    assert isinstance(loaded, Models) and len(attempts) == 2
    for _ in range(20):  # and once loaded, the same bundle is not loaded again
        assert reloader.poll(None) is None  # type: ignore[arg-type]
        time.sleep(0.01)
    assert len(attempts) == 2
    reloader.close()


def test_requests_that_arrive_together_are_one_load(tmp_path: Path) -> None:
    bundle = tmp_path / "cam.sdns"
    bundle.mkdir()
    (bundle / "manifest.json").write_text("{}")
    attempts: list[Path] = []
    reloader = Reloader(_settings(bundle), lambda p: attempts.append(p) or Detector())
    for _ in range(50):  # SIGHUP fifty times
        reloader.request()
    assert isinstance(_poll_until(reloader, Models), Models)
    assert attempts == [bundle]
    reloader.close()


_STOP_STORM = textwrap.dedent(
    """
    import os, signal, threading, time
    from sdns_monitor.stream.signals import forward_signals

    class Monitor:
        def __init__(self):
            self.stop = threading.Event()
            self.reloads = 0
        def reload(self):
            self.reloads += 1
        def request_stop(self):
            self.stop.set()

    monitor = Monitor()
    forward_signals(monitor)
    signal.setitimer(signal.ITIMER_REAL, 0.0001, 0.0001)  # SIGALRM is not forwarded
    signal.signal(signal.SIGALRM, lambda *_: os.kill(os.getpid(), signal.SIGHUP))
    for _ in range(5_000):
        monitor.stop.wait(0)  # the loop's waits, interrupted by handlers all the time
    signal.setitimer(signal.ITIMER_REAL, 0)
    os.kill(os.getpid(), signal.SIGTERM)
    assert monitor.stop.wait(5), "SIGTERM did not stop"
    time.sleep(0.1)
    print("reloads", monitor.reloads > 0)
    """
)


def test_signals_reach_the_monitor_from_a_thread_of_their_own() -> None:
    done = subprocess.run(
        [sys.executable, "-c", _STOP_STORM], capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0 and done.stdout.strip() == "reloads True", (
        done.returncode,
        done.stdout,
        done.stderr[-2000:],
    )
