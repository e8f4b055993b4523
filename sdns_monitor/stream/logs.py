"""Log lines that come in floods: dead letters of one kind, and the Kafka client's reconnect
lines while a broker is down."""

from __future__ import annotations

import logging
import re
import threading
import time
from collections import Counter as Tally


class Throttle:
    """At most one log line per key per `every_s`; counts what it held back. Keys beyond
    `max_keys` share one (hostile input must not grow it without bound)."""

    def __init__(self, every_s: float, max_keys: int = 256) -> None:
        self.every_s = every_s
        self.max_keys = max_keys
        self._last: dict[str, float] = {}
        self._held: Tally[str] = Tally()

    def ready(self, key: str) -> bool:
        if key not in self._last and len(self._last) >= self.max_keys:
            key = "(other kinds)"
        now = time.monotonic()
        if now - self._last.get(key, -self.every_s) >= self.every_s:
            self._last[key] = now
            return True
        self._held[key] += 1
        return False

    def take_suppressed(self, key: str) -> int:
        if key not in self._last:
            key = "(other kinds)"
        return self._held.pop(key, 0)


class ClientLogThrottle(logging.Filter):
    """For the handlers of `run`: the Kafka client logs every failed reconnect (several lines
    a second while a broker is down). Passes the first line of each kind (digits ignored),
    then one per `every_s` with how many were held back; other loggers pass untouched."""

    def __init__(self, every_s: float = 60.0, prefix: str = "kafka") -> None:
        super().__init__()
        self.prefix = prefix
        self._throttle = Throttle(every_s)
        self._lock = threading.Lock()

    def filter(self, record: logging.LogRecord) -> bool:
        if not record.name.startswith(self.prefix):
            return True
        key = f"{record.name}:{re.sub(r'[0-9]+', '#', record.getMessage())[:120]}"
        with self._lock:
            if not self._throttle.ready(key):
                return False
            held = self._throttle.take_suppressed(key)
        if held:
            record.msg = f"{record.getMessage()} ({held} similar lines held back)"
            record.args = None
        return True
