"""Signals of `run`: SIGTERM and SIGINT stop it (finish the batches in flight, commit, leave the
group), SIGHUP reloads the bundles.

A handler runs on the main thread between two bytecodes of whatever it was doing, so one that
takes a lock the loop may hold (an Event's condition, a queue's mutex) can deadlock the loop.
The handlers here only put the signal on a `SimpleQueue` (its put is reentrant), and a thread
of their own acts on it.
"""

from __future__ import annotations

import queue
import signal
import threading
from typing import Any

STOP = (signal.SIGINT, signal.SIGTERM)
RELOAD = signal.SIGHUP


def forward_signals(monitor: Any) -> None:
    """Install the handlers for `monitor` (a StreamMonitor); call from the main thread."""
    received: queue.SimpleQueue[int] = queue.SimpleQueue()

    def act() -> None:
        while True:
            if received.get() == RELOAD:
                monitor.reload()
            else:
                monitor.request_stop()

    threading.Thread(target=act, name="sdns-signals", daemon=True).start()
    for sig in (*STOP, RELOAD):
        signal.signal(sig, lambda signum, _frame: received.put(signum))
