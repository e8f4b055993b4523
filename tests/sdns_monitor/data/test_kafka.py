"""kafka:// specs: the grammar, the round-robin choice of frames under max=N, and the client
security taken from the SDNS_* environment variables.

Reading a real topic is tested against the broker in tests/integration/test_examples.py; the
test broker speaks plaintext only, so the security options are checked on the consumer's
arguments.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import kafka
import numpy as np
import pytest
from kafka.errors import KafkaConnectionError

from sdns_monitor.data import DatasetSpec, load_dataset, parse_spec, usage
from sdns_monitor.data.kafka_topic import _hungry, _Partition, _round_robin
from sdns_monitor.errors import ConfigError, DataError
from sdns_monitor.settings import ENV_PREFIX, KafkaSecurity


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


SPEC = "kafka://127.0.0.1:9/frames?timeout_s=1"
_SECURITY_KEYS = ("security_", "sasl_", "ssl_")


@pytest.fixture
def consumer_kwargs(monkeypatch: pytest.MonkeyPatch) -> list[dict[str, Any]]:
    """The keyword arguments of every KafkaConsumer the reader builds; the fake one finds no
    broker, so a read stops right after building it. No SDNS_ security variable is inherited."""
    for name in KafkaSecurity.model_fields:
        monkeypatch.delenv(ENV_PREFIX + name.upper(), raising=False)
    built: list[dict[str, Any]] = []

    def fake_consumer(*topics: str, **kwargs: Any) -> None:
        built.append(kwargs)
        raise KafkaConnectionError("no broker")

    monkeypatch.setattr(kafka, "KafkaConsumer", fake_consumer)
    return built


def test_without_security_variables_the_reader_connects_in_plaintext(
    consumer_kwargs: list[dict[str, Any]],
) -> None:
    with pytest.raises(DataError, match="no Kafka broker answered"):
        load_dataset(SPEC)
    (kwargs,) = consumer_kwargs
    assert kwargs.get("security_protocol", "PLAINTEXT") == "PLAINTEXT"
    assert not any(k.startswith(("sasl_", "ssl_")) for k in kwargs)


def test_the_reader_takes_tls_and_sasl_from_the_variables_run_reads(
    consumer_kwargs: list[dict[str, Any]], monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    ca = tmp_path / "ca.pem"
    ca.write_text("-----BEGIN CERTIFICATE-----\n")
    monkeypatch.setenv("SDNS_SECURITY_PROTOCOL", "SSL")
    monkeypatch.setenv("SDNS_SSL_CAFILE", str(ca))
    with pytest.raises(DataError, match="no Kafka broker answered"):
        load_dataset(SPEC)
    assert consumer_kwargs[-1]["security_protocol"] == "SSL"
    assert consumer_kwargs[-1]["ssl_cafile"] == str(ca)

    monkeypatch.setenv("SDNS_SECURITY_PROTOCOL", "SASL_SSL")
    monkeypatch.setenv("SDNS_SASL_MECHANISM", "SCRAM-SHA-512")
    monkeypatch.setenv("SDNS_SASL_PLAIN_USERNAME", "svc")
    monkeypatch.setenv("SDNS_SASL_PLAIN_PASSWORD", "hunter2")
    with pytest.raises(DataError, match="no Kafka broker answered") as info:
        load_dataset(SPEC)
    assert "hunter2" not in str(info.value)
    security = {k: v for k, v in consumer_kwargs[-1].items() if k.startswith(_SECURITY_KEYS)}
    assert security == {
        "security_protocol": "SASL_SSL",
        "sasl_mechanism": "SCRAM-SHA-512",
        "sasl_plain_username": "svc",
        "sasl_plain_password": "hunter2",
        "ssl_cafile": str(ca),
    }


@pytest.mark.parametrize(
    ("env", "match"),
    [
        (
            {"SDNS_SECURITY_PROTOCOL": "SASL_SSL"},
            "SDNS_SECURITY_PROTOCOL SASL_SSL needs a SDNS_SASL_MECHANISM",
        ),
        ({"SDNS_SECURITY_PROTOCOL": "TLS"}, "invalid setting SDNS_SECURITY_PROTOCOL: Input should"),
        ({"SDNS_SSL_CAFILE": "/nonexistent/ca.pem"}, "SDNS_SSL_CAFILE /nonexistent/ca.pem is not"),
        ({"SDNS_SASL_MECHANISM": "PLAIN"}, "SDNS_SASL_MECHANISM is set but SDNS_SECURITY_PROTO"),
    ],
)
def test_bad_security_variables_are_one_line_config_errors_before_connecting(
    consumer_kwargs: list[dict[str, Any]],
    monkeypatch: pytest.MonkeyPatch,
    env: dict[str, str],
    match: str,
) -> None:
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    with pytest.raises(ConfigError, match=match) as info:
        load_dataset(SPEC)
    assert str(info.value).startswith(SPEC + ": ") and "\n" not in str(info.value)
    assert consumer_kwargs == []


def test_unrelated_run_variables_do_not_concern_the_reader(
    consumer_kwargs: list[dict[str, Any]], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A bad SDNS_FROM_BEGINNING is `run`'s business, not a data set's."""
    monkeypatch.setenv("SDNS_FROM_BEGINNING", "maybe")
    with pytest.raises(DataError, match="no Kafka broker answered"):
        load_dataset(SPEC)
    assert consumer_kwargs[-1].get("security_protocol", "PLAINTEXT") == "PLAINTEXT"
