"""kafka:// specs: the grammar, and the round-robin choice of frames under max=N.

Reading a real topic is tested against the broker in tests/integration/test_examples.py.
"""

from __future__ import annotations

import numpy as np
import pytest

from sdns_monitor.data import DatasetSpec, parse_spec, usage
from sdns_monitor.data.kafka_topic import _hungry, _Partition, _round_robin
from sdns_monitor.errors import DataError


@pytest.mark.parametrize(
    ("text", "args"),
    [
        (
            "kafka://127.0.0.1:9092/camera-frames",
            ("127.0.0.1:9092", "camera-frames", "all", "60.0"),
        ),
        ("KAFKA://broker/t.1_x", ("broker:9092", "t.1_x", "all", "60.0")),
        ("kafka://a:1,b/t?max=10&timeout_s=2.5", ("a:1,b:9092", "t", "10", "2.5")),
        ("kafka://h:9/t?timeout_s=5&max=007", ("h:9", "t", "7", "5.0")),
        ("kafka://[::1]:9093/t", ("[::1]:9093", "t", "all", "60.0")),
    ],
)
def test_kafka_specs_fill_defaults(text: str, args: tuple[str, ...]) -> None:
    assert parse_spec(text) == DatasetSpec("kafka", args)


@pytest.mark.parametrize(
    ("text", "match"),
    [
        ("kafka:broker:9092/t", "write kafka://HOST:PORT/TOPIC"),
        ("kafka", "write kafka://"),
        ("kafka://h:9092/", "'' is not a topic name"),
        ("kafka://h:9092/a/b", "'a/b' is not a topic name"),
        ("kafka://h:9092", "is not a topic name"),
        ("kafka://h:x/t", "bad broker address 'h:x'"),
        ("kafka://h:70000/t", "bad broker address"),
        ("kafka:///t", "bad broker address ''"),
        ("kafka://h/t?max=0", "max must be a positive number of frames"),
        ("kafka://h/t?max=-3", "max must be"),
        ("kafka://h/t?limit=3", "unknown option 'limit=3'"),
        ("kafka://h/t?max", "unknown option 'max'"),
        ("kafka://h/t?timeout_s=inf", "timeout_s must be a positive number"),
        ("kafka://h/t?timeout_s=0", "timeout_s must be"),
        ("kafka://h/t@3", "no @class filter"),
        ("kafka://user@h/t", "credentials"),
    ],
)
def test_bad_kafka_specs_say_what_is_wrong(text: str, match: str) -> None:
    with pytest.raises(DataError, match=match):
        parse_spec(text)


def test_usage_names_the_kafka_form() -> None:
    assert "kafka://HOST:PORT/TOPIC[?max=N&timeout_s=S]" in usage()


def _naive_round_robin(counts: list[int], want: int) -> list[int]:
    take = [0] * len(counts)
    while sum(take) < min(want, sum(counts)):
        for i, c in enumerate(counts):
            if take[i] < c and sum(take) < want:
                take[i] += 1
    return take


def test_round_robin_takes_the_first_frames_of_every_partition_in_turn() -> None:
    assert _round_robin([5, 1, 3], 6) == [3, 1, 2]
    assert _round_robin([5, 1, 3], None) == [5, 1, 3]
    assert _round_robin([5, 1, 3], 100) == [5, 1, 3]
    assert _round_robin([0, 4], 2) == [0, 2]
    rng = np.random.default_rng(0)
    for _ in range(300):
        counts = [int(c) for c in rng.integers(0, 12, rng.integers(1, 6))]
        want = int(rng.integers(1, 40))
        assert _round_robin(counts, want) == _naive_round_robin(counts, want), (counts, want)


def test_the_frames_taken_do_not_depend_on_the_order_fetches_arrive_in() -> None:
    """Whatever order the broker hands out chunks of the partitions in, reading stops with the
    frames that full knowledge of the topic would choose."""
    rng = np.random.default_rng(1)
    for _ in range(300):
        totals = [int(c) for c in rng.integers(0, 30, rng.integers(1, 5))]
        want = int(rng.integers(1, 60))
        parts = {n: _Partition(listed_end=t, done=t == 0) for n, t in enumerate(totals)}
        while hungry := _hungry(parts, want):
            n = int(rng.choice(sorted(hungry)))  # only partitions still hungry are fetched
            part = parts[n]
            chunk = min(int(rng.integers(1, 8)), totals[n] - len(part.frames))
            part.frames.extend(np.zeros((1, 1, 1), np.uint8) for _ in range(chunk))
            part.done = len(part.frames) == totals[n]
        taken = _round_robin([len(p.frames) for p in parts.values()], want)
        assert taken == _round_robin(totals, want), (totals, want)
