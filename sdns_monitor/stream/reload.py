"""Hot reload: `StreamMonitor.reload()` (SIGHUP in `run`), or a change of a bundle at a model
path, loads the new bundles on a background thread while the loop goes on; batches consumed
from then on use them, and the batches in flight finish on the old models.

A load that fails (a bundle copied file by file, caught half-way; a tampered one) is logged,
the old models stay, and it is tried again after a backoff (1 s doubling to 5 minutes) until a
load succeeds or a newer request replaces it. A bundle's signature (the manifest's path,
mtime and size) counts as seen only once it loaded.
"""

from __future__ import annotations

import concurrent.futures
import logging
import os
import queue
import time
from collections.abc import Callable
from pathlib import Path

from sdns_monitor.detector import Detector
from sdns_monitor.settings import RunSettings
from sdns_monitor.stream.routing import Models

log = logging.getLogger("sdns_monitor.stream")

RETRY_S = (1.0, 300.0)  # first and longest wait before a failed load is tried again

# (the default model's path, the paths to load again: None for all)
Request = tuple[Path, set[Path] | None]


class Reloader:
    """Requests (from any thread or a signal handler), bundle change checks, and one background
    load at a time; `poll` is called by the loop between batches."""

    def __init__(self, settings: RunSettings, load: Callable[[Path], Detector]) -> None:
        self.settings = settings
        self._load = load
        # SimpleQueue.put is reentrant: safe in a signal handler that interrupts poll().
        self._requests: queue.SimpleQueue[Request] = queue.SimpleQueue()
        self._pending: Request | None = None  # the loop thread's: waiting for a load slot
        self._loading: tuple[Request, concurrent.futures.Future[Models]] | None = None
        self._pool = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="sdns-reload")
        self._loaded = {p: signature(p) for p in self._paths()}  # what the models in use are
        self._next_check = time.monotonic() + settings.reload_check_s
        self._retry: tuple[Request, float] | None = None  # a failed load: (request, when)
        self._backoff: float | None = None  # the wait before the last retry; None: no failure
        self._failed: dict[Path, tuple[str, int, int] | None] = {}  # signatures that failed

    def _paths(self) -> list[Path]:
        return [self.settings.model, *(r.model for r in self.settings.routes)]

    def request(self, path: str | Path | None = None, changed: set[Path] | None = None) -> None:
        """Ask for the bundles to be loaded again (all, or those at `changed`); with `path`, the
        default model comes from there. Takes no lock: safe in a signal handler."""
        default = Path(path) if path is not None else self.settings.model
        if path is not None and changed is not None:
            changed = changed | {default}
        self._requests.put((default, changed))

    def poll(self, models: Models) -> Models | Exception | None:
        """Start a requested load; the new models once a load finished, the error if it
        failed, else None."""
        self._check_bundles()
        self._take_requests()
        if self._loading is None and self._pending is not None:
            (default, changed), self._pending = self._pending, None
            future = self._pool.submit(
                Models.load, default, self.settings.routes, self._load, models, changed
            )
            self._loading = ((default, changed), future)
        if self._loading is None or not self._loading[1].done():
            return None
        (request, future), self._loading = self._loading, None
        try:
            new = future.result()
        except Exception as exc:  # whatever a bundle does, the old models stay
            self._retry_later(request)
            return exc
        self._retry, self._backoff = None, None
        for path in request[1] if request[1] is not None else self._paths():
            self._loaded[path] = signature(path)
        return new

    def _take_requests(self) -> None:
        """Merge the requests that came in (and a retry that is due) into `_pending`."""
        taken: list[Request] = []
        while True:
            try:
                taken.append(self._requests.get_nowait())
            except queue.Empty:
                break
        if taken:
            self._retry = None  # a newer request replaces the one being retried
        elif self._retry is not None and time.monotonic() >= self._retry[1]:
            taken.append(self._retry[0])
            self._retry = None
        if self._pending is not None:
            taken.insert(0, self._pending)
        if not taken:
            return
        everything = any(changed is None for _, changed in taken)
        paths: set[Path] = set().union(*(c for _, c in taken if c is not None))
        self._pending = (taken[-1][0], None if everything else paths)

    def _retry_later(self, request: Request) -> None:
        backoff = RETRY_S[0] if self._backoff is None else min(self._backoff * 2, RETRY_S[1])
        self._retry, self._backoff = (request, time.monotonic() + backoff), backoff
        self._failed = {p: signature(p) for p in self._paths()}
        log.info("the failed reload is tried again in %.0f s", backoff)

    def _check_bundles(self) -> None:
        every = self.settings.reload_check_s
        if every <= 0 or time.monotonic() < self._next_check:
            return
        self._next_check = time.monotonic() + every
        if self._loading is not None:
            return
        touched = {
            path
            for path in self._paths()
            if (now := signature(path)) is not None
            and now != self._loaded.get(path)
            and (self._backoff is None or now != self._failed.get(path))  # else: the retry's
        }
        if touched:
            log.info("the bundle at %s changed; reloading", ", ".join(map(str, sorted(touched))))
            self.request(changed=touched)

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)


def signature(path: Path) -> tuple[str, int, int] | None:
    """What changes when a bundle at `path` is replaced (also through a swapped symlink)."""
    try:
        manifest = Path(os.path.realpath(path)) / "manifest.json"
        st = manifest.stat()
    except OSError:
        return None
    return str(manifest), st.st_mtime_ns, st.st_size
