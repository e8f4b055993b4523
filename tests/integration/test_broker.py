"""The development broker: a real Kafka-protocol server that kafka-python talks to."""

from __future__ import annotations

import signal
import subprocess
import sys
import uuid

import pytest
from kafka import KafkaAdminClient, KafkaConsumer, KafkaProducer
from kafka.admin import NewTopic

from sdns_monitor.broker import Broker, BrokerError, free_port, start_broker, wait_ready

# Tansu holds a new group's join for half the session timeout (ENVIRONMENT.md).
GROUP_TIMEOUTS = {"session_timeout_ms": 6000, "heartbeat_interval_ms": 1000}


def _topic(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:8]}"


@pytest.mark.integration
def test_round_trip_with_a_consumer_group_and_commits(kafka_broker: Broker) -> None:
    topic, group = _topic("frames"), _topic("group")
    admin = KafkaAdminClient(bootstrap_servers=kafka_broker.bootstrap_servers)
    admin.create_topics([NewTopic(topic, num_partitions=2, replication_factor=1)])
    admin.close()
    producer = KafkaProducer(bootstrap_servers=kafka_broker.bootstrap_servers)
    for i in range(20):
        producer.send(topic, key=f"cam{i % 2}".encode(), value=f"frame-{i}".encode())
    producer.flush()
    producer.close()

    def consume(n: int) -> list[bytes]:
        consumer = KafkaConsumer(
            topic,
            bootstrap_servers=kafka_broker.bootstrap_servers,
            group_id=group,
            auto_offset_reset="earliest",
            enable_auto_commit=False,
            consumer_timeout_ms=8000,
            **GROUP_TIMEOUTS,
        )
        values = []
        for message in consumer:
            values.append(message.value)
            if len(values) == n:
                break
        consumer.commit()
        consumer.close()
        return values

    first = consume(20)
    assert sorted(first) == sorted(f"frame-{i}".encode() for i in range(20))
    # Everything was committed: a new consumer of the same group gets nothing more.
    assert consume(1) == []


@pytest.mark.integration
def test_cli_broker_serves_until_sigterm() -> None:
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "sdns_monitor.cli", "broker", "--port", str(port)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()
        assert f"listening on 127.0.0.1:{port}" in line
        wait_ready(f"127.0.0.1:{port}", timeout=10)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=20) == 0
        assert "broker stopped" in proc.stdout.read()
    finally:
        proc.kill()
    with pytest.raises(BrokerError):  # and the port is closed again
        wait_ready(f"127.0.0.1:{port}", timeout=1)


@pytest.mark.integration
def test_port_in_use_is_a_clear_error(kafka_broker: Broker) -> None:
    with pytest.raises(BrokerError, match="is in use; choose another --port"):
        start_broker(kafka_broker.port)
