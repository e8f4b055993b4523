"""Readiness and liveness: what makes /readyz and /healthz fail."""

from __future__ import annotations

import threading
from collections import Counter

from sdns_monitor.stream.health import HEAD_STALL_S, STARVED_S, Status


def _joined() -> threading.Event:
    joined = threading.Event()
    joined.set()
    return joined


def test_a_dead_worker_thread_fails_liveness() -> None:
    status = Status(_joined())
    alive = [True]
    status.workers["scorer"] = lambda: alive[0]
    assert status.not_alive() is None
    alive[0] = False
    assert status.not_alive() == "not alive: the scorer thread died"


def test_a_head_batch_older_than_the_bound_fails_readiness_until_it_moves() -> None:
    status = Status(_joined())
    status.gauges(Counter(), None, 0, 1, head_age_s=1.0)
    assert status.not_ready() is None
    status.gauges(Counter(), None, 0, 1, head_age_s=HEAD_STALL_S + 1)
    assert (status.not_ready() or "").startswith("not ready: the oldest batch in flight has waited")
    assert status.metrics.ready._value.get() == 0
    status.gauges(Counter(), None, 0, 1, head_age_s=0.0)
    assert status.not_ready() is None


def test_readiness_names_the_first_problem() -> None:
    joined = threading.Event()
    status = Status(joined)
    assert status.not_ready() == "not ready: the consumer has not joined its group yet"
    joined.set()
    status.output_failed("2 of 9 records were not delivered")
    assert status.not_ready() == (
        "not ready: outputs not delivered (2 of 9 records were not delivered)"
    )
    status.outputs_recovered()
    assert status.not_ready() is None and status.stats.output_failures == 1


def test_cameras_and_clamped_timestamps_reach_the_metrics_as_running_totals() -> None:
    status = Status(_joined())
    status.gauges(Counter(), None, 0, 1, 0.0, cameras=3, clamped=Counter(future=2))
    status.gauges(Counter(), None, 0, 1, 0.0, cameras=5, clamped=Counter(future=2, past=1))
    registry = status.metrics.registry
    assert registry.get_sample_value("sdns_cameras") == 5
    value = registry.get_sample_value
    assert value("sdns_clamped_timestamps_total", {"direction": "future"}) == 2  # not 4
    assert value("sdns_clamped_timestamps_total", {"direction": "past"}) == 1


def test_a_consumer_behind_that_fetches_nothing_fails_readiness_until_records_come() -> None:
    status = Status(_joined())
    status.starved(STARVED_S - 1, behind=500)
    assert status.not_ready() is None  # a slow fetch is not yet a stall
    status.starved(STARVED_S + 1, behind=500)
    assert "500 messages are waiting and none was fetched" in (status.not_ready() or "")
    status.starved(0.0, behind=0)
    assert status.not_ready() is None
