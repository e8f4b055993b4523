"""Incidents: one stuck or broken camera makes one incident with a bounded number of alerts.

Per key (camera/stream), a flagged frame opens an incident unless the key already has one whose
last flagged frame is less than `window_s` old. Within an incident, an alert is sent for the
first frame and then at most one per `cooldown_s`; the other flagged frames are counted (and
still appear in the scores topic and the metrics). When a key has had no flagged frame for
`window_s`, its incident closes and a closing record says so.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, replace

from sdns_monitor.records import IncidentClosed, IncidentRef


@dataclass
class _Open:
    id: str
    key: str | None
    key_encoding: str | None
    opened_at_ms: int
    last_flag_ms: int
    last_alert_ms: int
    frames: int = 1
    alerts: int = 1


def incident_id(key: str | None, opened_at_ms: int) -> str:
    """`DIGEST@OPENED_AT_MS`: 16 hex digits of the key's SHA-256, so that the id stays short
    whatever the key (the key itself is in the record beside it)."""
    digest = hashlib.sha256(b"\x00" if key is None else key.encode("utf-8")).hexdigest()
    return f"{digest[:16]}@{opened_at_ms}"


class IncidentTracker:
    """Decides which flagged frames become alerts; times are message or wall-clock ms."""

    def __init__(self, window_s: float, cooldown_s: float) -> None:
        self.window_ms = int(window_s * 1000)
        self.cooldown_ms = int(cooldown_s * 1000)
        self._open: dict[str | None, _Open] = {}

    @property
    def open_count(self) -> int:
        return len(self._open)

    def snapshot(self) -> dict[str | None, _Open]:
        """A copy of the state, for `restore` when a batch's outputs were not delivered."""
        return {key: replace(inc) for key, inc in self._open.items()}

    def restore(self, snapshot: dict[str | None, _Open]) -> None:
        """Forget what happened since `snapshot` (the batch will be scored again)."""
        self._open = snapshot

    def flagged(
        self, key: str | None, key_encoding: str | None, now_ms: int
    ) -> tuple[IncidentRef, bool]:
        """Record a flagged frame of `key`; returns its incident and whether to send an alert."""
        inc = self._open.get(key)
        if inc is None or now_ms - inc.last_flag_ms > self.window_ms:
            inc = _Open(incident_id(key, now_ms), key, key_encoding, now_ms, now_ms, now_ms)
            self._open[key] = inc
            send = True
        else:
            inc.frames += 1
            inc.last_flag_ms = max(inc.last_flag_ms, now_ms)
            send = now_ms - inc.last_alert_ms >= self.cooldown_ms
            if send:
                inc.alerts += 1
                inc.last_alert_ms = now_ms
        ref = IncidentRef(
            id=inc.id, opened_at_ms=inc.opened_at_ms, frames=inc.frames, alerts=inc.alerts
        )
        return ref, send

    def expire(self, now_ms: int) -> list[IncidentClosed]:
        """Close the incidents whose key has been quiet for a whole window."""
        closed = []
        for key, inc in list(self._open.items()):
            if now_ms - inc.last_flag_ms > self.window_ms:
                del self._open[key]
                closed.append(
                    IncidentClosed(
                        key=inc.key,
                        key_encoding=inc.key_encoding,  # type: ignore[arg-type]
                        incident_id=inc.id,
                        opened_at_ms=inc.opened_at_ms,
                        closed_at_ms=now_ms,
                        frames=inc.frames,
                        alerts=inc.alerts,
                    )
                )
        return closed
