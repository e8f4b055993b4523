"""Hot reload: `StreamMonitor.reload()` (SIGHUP in `run`), or a change of a bundle at a model
path, loads the new bundles on a background thread while the loop goes on; batches consumed
from then on use them, and the batches in flight finish on the old models. A bundle that fails
to load is logged and the old models stay."""

from __future__ import annotations

import concurrent.futures
import logging
import os
import threading
import time
from collections.abc import Callable
from pathlib import Path

from sdns_monitor.detector import Detector
from sdns_monitor.errors import SdnsError
from sdns_monitor.settings import RunSettings
from sdns_monitor.stream.routing import Models

log = logging.getLogger("sdns_monitor.stream")


class Reloader:
    """Requests (from any thread), bundle change checks and one background load at a time;
    `poll` is called by the loop between batches."""

    def __init__(self, settings: RunSettings, load: Callable[[Path], Detector]) -> None:
        self.settings = settings
        self._load = load
        self._lock = threading.Lock()
        # (the default model's path, the paths to load again: None for all) of a request
        self._request: tuple[Path, set[Path] | None] | None = None
        self._loading: concurrent.futures.Future[Models] | None = None
        self._pool = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="sdns-reload")
        self._signatures = {p: signature(p) for p in self._paths()}
        self._next_check = time.monotonic() + settings.reload_check_s

    def _paths(self) -> list[Path]:
        return [self.settings.model, *(r.model for r in self.settings.routes)]

    def request(self, path: str | Path | None = None, changed: set[Path] | None = None) -> None:
        """Ask for the bundles to be loaded again (all, or those at `changed`); with `path`, the
        default model comes from there. Safe in a signal handler or from another thread."""
        default = Path(path) if path is not None else self.settings.model
        if path is not None and changed is not None:
            changed = changed | {default}
        with self._lock:
            self._request = (default, changed)

    def poll(self, models: Models) -> Models | Exception | None:
        """Start a requested load; the new models once a load finished, the error if it
        failed, else None."""
        self._check_bundles()
        with self._lock:
            request, self._request = self._request, None
        if request is not None and self._loading is None:
            default, changed = request
            self._loading = self._pool.submit(
                Models.load, default, self.settings.routes, self._load, models, changed
            )
        elif request is not None:  # one load at a time: ask again once this one is done
            with self._lock:
                self._request = self._request or request
        if self._loading is None or not self._loading.done():
            return None
        loading, self._loading = self._loading, None
        try:
            return loading.result()
        except (SdnsError, OSError) as exc:
            return exc

    def _check_bundles(self) -> None:
        every = self.settings.reload_check_s
        if every <= 0 or time.monotonic() < self._next_check:
            return
        self._next_check = time.monotonic() + every
        touched: set[Path] = set()
        for path in self._paths():
            now = signature(path)
            if now != self._signatures.get(path) and now is not None:
                log.info("the bundle at %s changed; reloading", path)
                self._signatures[path] = now
                touched.add(path)
        if touched:
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
