"""`sdns-monitor run`: watch Kafka topics of frames, score them, publish alerts.

One idea per module; `monitor.StreamMonitor` is the loop, as a short sequence of calls on the
parts that own their state:

    monitor     StreamMonitor: start and stop, the loop
    intake      micro-batches from the consumer, backpressure (pause and resume)
    batch       a micro-batch and what it did; decoding messages into frames (no Kafka)
    scorer      the scorer thread: scores, alerts, incidents, dead letters
    offsets     batches in flight, in-order commits, seek back, the rebalance listener
    kafka       client construction, producer renewal, connection health
    reload      hot reload of the bundles
    health      counters, metrics of delivered batches, readiness and liveness
    prometheus  the metrics registry
    server      the /metrics, /healthz, /readyz server
    signals     SIGTERM, SIGINT, SIGHUP handed to a thread of their own
    routing     message keys to bundles
    incidents   one incident per stuck camera, a bounded number of alerts
    logs        throttled log lines
"""

from __future__ import annotations

from sdns_monitor.errors import BrokerUnreachable, OutputError
from sdns_monitor.stream.health import StreamStats
from sdns_monitor.stream.logs import ClientLogThrottle
from sdns_monitor.stream.monitor import StreamMonitor

__all__ = ["BrokerUnreachable", "ClientLogThrottle", "OutputError", "StreamMonitor", "StreamStats"]
