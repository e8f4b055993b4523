"""Intake: how long a consumer that is behind has fetched nothing (a broker that stopped
serving fetches, which no connection check sees)."""

from __future__ import annotations

import time
from typing import Any

from sdns_monitor.stream.intake import Intake


class _Consumer:
    def __init__(self) -> None:
        self.records: list[Any] = []

    def poll(self, timeout_ms: int, max_records: int | None) -> dict[str, list[Any]]:
        out, self.records = self.records, []
        return {"tp": out} if out else {}

    def assignment(self) -> set[str]:
        return {"tp"}

    def pause(self, *partitions: str) -> None: ...

    def paused(self) -> set[str]:
        return {"tp"}

    def resume(self, *partitions: str) -> None: ...


def test_starvation_counts_from_the_last_records_while_behind_and_not_paused() -> None:
    consumer = _Consumer()
    intake = Intake(consumer, batch_size=8, max_wait_ms=10)
    intake.last_records -= 300  # nothing fetched for five minutes
    assert intake.starved_s(behind=0) == 0.0  # caught up: nothing to fetch, not starved
    intake.last_records -= 300
    assert intake.starved_s(behind=40) >= 299
    consumer.records = ["m"]
    assert intake._poll(0, None) == ["m"]
    assert intake.starved_s(behind=40) < 1
    intake.hold()  # paused on purpose (backpressure): not starved however long
    intake.last_records = time.monotonic() - 300
    assert intake.starved_s(behind=40) == 0.0
