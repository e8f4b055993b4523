"""Read the alerts of `sdns-monitor run`, one line each, and keep the frames that raised them.

Every alert names its frame by `source` (topic, partition, offset, frame index); with
`--save-dir` the frame is fetched from its topic and written there as a PNG, named
`KEY_TOPIC-PARTITION-OFFSET[-FRAME].png`. Camera alarms (`camera-alarm`, the default of `run`)
and frame alerts (`alert`, with `run --alerts frames`) are both alerts; `camera-cleared`,
`camera-silent` and `incident-closed` records print one line each.

    python examples/alert_consumer.py --bootstrap-servers 127.0.0.1:9092 \\
        --alert-topic sdns-alerts --save-dir flagged/

Output lines (stdout):
    ALERT  cam-7  score 12.41  p 0.0033  alarm 5d1e0c2f9a7b3e41@0:42 (since offset 35, alert 1)  camera-frames/0/42  -> flagged/cam-7_camera-frames-0-42.png
    CLEARED cam-7  alarm 5d1e0c2f9a7b3e41@0:42 after 61 frames, 1 alerts
    SILENT cam-3  no frame for 300 s; last camera-frames/1/977

`--max-alerts N` stops after N alerts and `--timeout S` after S seconds, for scripts: the exit
status is 1 when `--max-alerts` was given and fewer alerts came within `--timeout`. Without
`--group-id` nothing is committed and `--from-beginning` decides where reading starts; with it,
a restart resumes after the last alert read (against Tansu add `--session-timeout-ms 6000
--heartbeat-interval-ms 1000`).
"""

from __future__ import annotations

import argparse
import io
import json
import re
import sys
import time
from pathlib import Path
from typing import Any

from PIL import Image
from pydantic import ValidationError

from sdns_monitor.errors import FrameError
from sdns_monitor.frames import decode_bytes
from sdns_monitor.records import (
    Alert,
    CameraAlert,
    CameraCleared,
    CameraSilent,
    IncidentClosed,
    Source,
)

_UNSAFE = re.compile(r"[^A-Za-z0-9._-]+")


class FrameFetcher:
    """Fetches one message by (topic, partition, offset), with its own group-less consumer."""

    def __init__(self, bootstrap_servers: str, timeout_s: float = 10.0) -> None:
        from kafka import KafkaConsumer

        self.timeout_s = timeout_s
        self.consumer = KafkaConsumer(
            bootstrap_servers=bootstrap_servers,
            group_id=None,
            enable_auto_commit=False,
            fetch_max_wait_ms=100,
            max_partition_fetch_bytes=17 * 1024 * 1024,
        )

    def fetch(self, source: Source) -> bytes | None:
        """The message value at `source`, or None when it is no longer on the topic."""
        from kafka import TopicPartition

        tp = TopicPartition(source.topic, source.partition)
        self.consumer.assign([tp])
        self.consumer.seek(tp, source.offset)
        deadline = time.monotonic() + self.timeout_s
        while time.monotonic() < deadline:
            for record in self.consumer.poll(timeout_ms=200).get(tp, []):
                if record.offset == source.offset:
                    return bytes(record.value or b"")
                if record.offset > source.offset:
                    return None  # deleted by retention or compaction
        return None

    def close(self) -> None:
        self.consumer.close()


def save_frame(value: bytes, source: Source, save_dir: Path) -> Path:
    """Decode the frame `source` names and write it as a PNG; raises FrameError."""
    frames = decode_bytes(value)
    if source.frame_index >= len(frames):
        raise FrameError(f"the message holds {len(frames)} frames, not {source.frame_index + 1}")
    frame = frames[source.frame_index]
    key = _UNSAFE.sub("_", source.key or "none")
    name = f"{key}_{source.topic}-{source.partition}-{source.offset}"
    name += f"-{source.frame_index}" if len(frames) > 1 else ""
    path = save_dir / f"{name}.png"
    buf = io.BytesIO()
    Image.fromarray(frame[..., 0] if frame.shape[-1] == 1 else frame).save(buf, format="PNG")
    path.write_bytes(buf.getvalue())
    return path


def describe(alert: Alert | CameraAlert, saved: str) -> str:
    """The one line printed for an alert."""
    s = alert.source
    incident = ""
    if isinstance(alert, CameraAlert):
        a = alert.alarm
        incident = f"  alarm {a.id} (since offset {a.first_frame.offset}, alert {a.alerts})"
    elif alert.incident is not None:
        i = alert.incident
        incident = f"  incident {i.id} (frame {i.frames}, alert {i.alerts})"
    where = f"{s.topic}/{s.partition}/{s.offset}" + (f"#{s.frame_index}" if s.frame_index else "")
    return (
        f"ALERT  {s.key}  score {alert.score:.2f}  p {alert.p_value:.4g}{incident}  {where}{saved}"
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bootstrap-servers", default="localhost:9092")
    parser.add_argument("--alert-topic", default="sdns-alerts")
    parser.add_argument("--group-id", help="commit progress in this consumer group")
    parser.add_argument(
        "--from-beginning",
        action="store_true",
        help="read alerts already on the topic (default: only new ones)",
    )
    parser.add_argument("--save-dir", type=Path, help="write each flagged frame here as a PNG")
    parser.add_argument("--max-alerts", type=int, help="stop after N alerts")
    parser.add_argument("--timeout", type=float, help="stop after S seconds")
    parser.add_argument("--session-timeout-ms", type=int, default=45_000)
    parser.add_argument("--heartbeat-interval-ms", type=int, default=3_000)
    args = parser.parse_args(argv)

    from kafka import KafkaConsumer
    from kafka.errors import KafkaError

    def log(message: str) -> None:
        print(message, file=sys.stderr, flush=True)

    try:
        consumer = KafkaConsumer(
            args.alert_topic,
            bootstrap_servers=args.bootstrap_servers,
            group_id=args.group_id,
            auto_offset_reset="earliest" if args.from_beginning else "latest",
            enable_auto_commit=args.group_id is not None,
            session_timeout_ms=args.session_timeout_ms,
            heartbeat_interval_ms=args.heartbeat_interval_ms,
        )
        fetcher = FrameFetcher(args.bootstrap_servers) if args.save_dir else None
    except KafkaError as exc:
        log(f"error: cannot reach Kafka at {args.bootstrap_servers} ({exc})")
        return 1
    if args.save_dir:
        args.save_dir.mkdir(parents=True, exist_ok=True)
    deadline = time.monotonic() + args.timeout if args.timeout is not None else float("inf")
    alerts = 0
    try:
        while alerts != args.max_alerts and time.monotonic() < deadline:
            wait = min(500.0, max(1.0, (deadline - time.monotonic()) * 1000))
            for record in _records(consumer.poll(timeout_ms=int(wait))):
                if alerts == args.max_alerts:
                    break
                line = _handle(record, fetcher, args.save_dir, log)
                if line is None:
                    continue
                alerts += line.startswith("ALERT")
                print(line, flush=True)
    except KeyboardInterrupt:
        pass
    finally:
        consumer.close()
        if fetcher is not None:
            fetcher.close()
    log(f"{alerts} alerts read from {args.alert_topic}")
    return 1 if args.max_alerts is not None and alerts < args.max_alerts else 0


def _records(batch: dict[Any, list[Any]]) -> list[Any]:
    """One poll's records, in (partition, offset) order."""
    return sorted((r for rs in batch.values() for r in rs), key=lambda r: (r.partition, r.offset))


def _handle(
    record: Any, fetcher: FrameFetcher | None, save_dir: Path | None, log: Any
) -> str | None:
    """The line for one alert-topic record, having saved its frame; None for records that are
    none of the kinds `run` writes there."""
    where = f"{record.topic}/{record.partition}/{record.offset}"
    try:
        data = json.loads(record.value)
        kind = data.get("kind") if isinstance(data, dict) else None
        if kind == "incident-closed":
            closed = IncidentClosed.model_validate(data)
            return (
                f"CLOSED {closed.key}  incident {closed.incident_id} after {closed.frames} "
                f"frames, {closed.alerts} alerts"
            )
        if kind == "camera-cleared":
            cleared = CameraCleared.model_validate(data)
            return (
                f"CLEARED {cleared.key}  alarm {cleared.alarm_id} after {cleared.frames} "
                f"frames, {cleared.alerts} alerts"
            )
        if kind == "camera-silent":
            silent = CameraSilent.model_validate(data)
            last = silent.last_frame
            return (
                f"SILENT {silent.key}  no frame for {silent.silent_s:.0f} s; last "
                f"{last.topic}/{last.partition}/{last.offset}"
            )
        alert: Alert | CameraAlert = (
            CameraAlert.model_validate(data)
            if kind == "camera-alarm"
            else Alert.model_validate(data)
        )
    except (ValueError, ValidationError) as exc:  # JSONDecodeError is a ValueError
        log(f"warning: {where} is not an alert record ({' '.join(str(exc).split())[:200]})")
        return None
    saved = ""
    if fetcher is not None and save_dir is not None:
        value = fetcher.fetch(alert.source)
        if value is None:
            log(f"warning: the frame of the alert at {where} is no longer on its topic")
        else:
            try:
                saved = f"  -> {save_frame(value, alert.source, save_dir)}"
            except FrameError as exc:
                log(f"warning: the frame of the alert at {where} does not decode ({exc})")
    return describe(alert, saved)


if __name__ == "__main__":
    sys.exit(main())
