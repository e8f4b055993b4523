"""The Kafka client's reconnect lines are throttled in `run`'s logs; ours are not."""

from __future__ import annotations

import logging

from sdns_monitor.stream.logs import ClientLogThrottle


def _record(name: str, message: str) -> logging.LogRecord:
    return logging.LogRecord(name, logging.ERROR, __file__, 1, message, None, None)


def test_client_lines_pass_once_per_kind_and_then_say_how_many_were_held() -> None:
    throttle = ClientLogThrottle(every_s=0.0)
    assert throttle.filter(_record("kafka.net.manager", "Connection failed: 111 ECONNREFUSED"))
    slow = ClientLogThrottle(every_s=3600)
    lines = [_record("kafka.net.manager", f"Connection to node {i} failed: 111") for i in range(50)]
    passed = [r for r in lines if slow.filter(r)]
    assert len(passed) == 1  # node numbers do not make a new kind
    other = _record("kafka.cluster", "Metadata refresh failed")
    assert slow.filter(other)  # another kind passes


def test_held_back_lines_are_counted_on_the_next_one() -> None:
    throttle = ClientLogThrottle(every_s=3600)
    throttle.filter(_record("kafka.x", "down 1"))
    for i in range(5):
        throttle.filter(_record("kafka.x", f"down {i}"))
    throttle._throttle.every_s = 0.0  # the minute is up
    record = _record("kafka.x", "down 9")
    assert throttle.filter(record)
    assert record.getMessage() == "down 9 (5 similar lines held back)"


def test_other_loggers_are_never_throttled() -> None:
    throttle = ClientLogThrottle(every_s=3600)
    assert all(throttle.filter(_record("sdns_monitor.stream", "commit failed")) for _ in range(20))
