"""`sdns-monitor demo`: the whole loop on real data with an embedded broker.

Fit (or reuse) a quick model on Fashion-MNIST, start Tansu, publish a stream of PNG frames from
several simulated cameras, watch it with `StreamMonitor`, and score the alerts against the known
truth of every frame:

- `shop-cam-1..3`: Fashion-MNIST test images, what the model was fitted for (in-distribution);
- `wrong-feed`: MNIST digits (a camera wired to the wrong stream);
- `new-scene`: animal silhouettes (a scene the model never saw);
- `broken-cam`: noise, stripes and black frames (a failing sensor);
- a few corrupt messages (truncated PNG, random bytes, empty), which go to the dead-letter topic.

The summary gives precision and recall of the flagged frames, which cameras raised an alarm
and how many of their frames each took (a camera alarm, `run`'s default: a broken camera raises
one alert, not one per frame; healthy cameras should raise none), frames/s, and a report file
with the flagged frames as thumbnails.
"""

from __future__ import annotations

import base64
import html
import json
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from sdns_monitor.broker import start_broker
from sdns_monitor.data import load_dataset
from sdns_monitor.errors import SdnsError
from sdns_monitor.report import png_bytes as _png
from sdns_monitor.settings import RunSettings
from sdns_monitor.stream import StreamMonitor

ID_CAMERAS = ("shop-cam-1", "shop-cam-2", "shop-cam-3")
OOD_KINDS = {"mnist": "wrong-feed", "animals": "new-scene", "broken": "broken-cam"}
SIZE = 28


@dataclass
class DemoFrame:
    camera: str
    kind: str  # fashion-mnist, mnist, animals, noise, stripes, black, corrupt
    value: bytes
    image: np.ndarray | None  # what was encoded (None for corrupt messages)

    @property
    def ood(self) -> bool:
        return self.kind not in ("fashion-mnist", "corrupt")


@dataclass
class DemoSummary:
    frames: int
    dead_letters: int
    alerts: int
    incidents_closed: int
    seconds: float
    frames_per_second: float
    alarm_rate: float
    per_kind: dict[str, dict[str, int]]  # kind -> {"frames", "flagged"}
    flagged_precision: float
    flagged_recall: float
    alert_precision: float  # alerts on out-of-distribution frames / alerts
    cameras_alerted: dict[str, int | None]  # camera -> its frames until its first alert, or None
    false_alarm_rate: float  # flagged / frames among in-distribution frames
    report: Path | None = None
    thumbnails: dict[str, list[tuple[np.ndarray, float, float]]] = field(default_factory=dict)


def make_stream(n_id: int, n_ood: int, seed: int = 0) -> list[DemoFrame]:
    """The demo's frames in a fixed shuffled order: `n_id` in-distribution frames, `n_ood`
    each of MNIST and animals, n_ood // 5 each of noise, stripes and black, 4 corrupt."""
    rng = np.random.default_rng(seed)
    frames: list[DemoFrame] = []

    def add(kind: str, camera: str, images: np.ndarray) -> None:
        for image in images:
            frames.append(DemoFrame(camera, kind, _png(image), image))

    fashion = load_dataset("fashion-mnist:test", size=SIZE, channels=1).images
    for i, idx in enumerate(rng.choice(len(fashion), n_id, replace=False)):
        add("fashion-mnist", ID_CAMERAS[i % len(ID_CAMERAS)], fashion[idx : idx + 1])
    mnist = load_dataset("mnist:test", size=SIZE, channels=1).images
    add("mnist", OOD_KINDS["mnist"], mnist[rng.choice(len(mnist), n_ood, replace=False)])
    animals = load_dataset("animals", size=SIZE, channels=1).images
    n_animals = min(n_ood, len(animals))
    add(
        "animals", OOD_KINDS["animals"], animals[rng.choice(len(animals), n_animals, replace=False)]
    )
    n_broken = max(n_ood // 5, 1)
    add("noise", OOD_KINDS["broken"], rng.integers(0, 256, (n_broken, SIZE, SIZE, 1), np.uint8))
    add("stripes", OOD_KINDS["broken"], _stripes(n_broken, rng))
    add("black", OOD_KINDS["broken"], np.zeros((n_broken, SIZE, SIZE, 1), np.uint8))
    truncated = frames[0].value[: len(frames[0].value) // 2]
    for value in (truncated, rng.bytes(300), b"", b"GIF89a not really"):
        frames.append(DemoFrame("shop-cam-1", "corrupt", value, None))
    order = rng.permutation(len(frames))
    return [frames[i] for i in order]


def _stripes(n: int, rng: np.random.Generator) -> np.ndarray:
    out = np.zeros((n, SIZE, SIZE, 1), np.uint8)
    for i in range(n):
        period = int(rng.integers(2, 8))
        bars = (np.arange(SIZE) // period % 2 * 255).astype(np.uint8)
        out[i, :, :, 0] = bars[:, None] if i % 2 else bars[None, :]
    return out


def run_demo(
    model: Path,
    workdir: Path,
    *,
    n_id: int = 1500,
    n_ood: int = 100,
    alarm_rate: float | None = None,
    progress: Callable[[int, int], None] | None = None,
    log: Callable[[str], None] = print,
) -> DemoSummary:
    """Start the broker, publish the stream, monitor it, and measure the alerts."""
    from kafka import KafkaAdminClient, KafkaProducer
    from kafka.admin import NewTopic

    workdir.mkdir(parents=True, exist_ok=True)
    stream = make_stream(n_id, n_ood)
    with start_broker(log=workdir / "tansu.log") as broker:
        log(f"broker (Tansu) on {broker.bootstrap_servers}")
        names = {
            "frames": "camera-frames",
            "alerts": "sdns-alerts",
            "dlq": "sdns-dead-letters",
            "scores": "sdns-scores",
        }
        admin = KafkaAdminClient(bootstrap_servers=broker.bootstrap_servers)
        admin.create_topics([NewTopic(t, 2 if k == "frames" else 1, 1) for k, t in names.items()])
        admin.close()

        producer = KafkaProducer(bootstrap_servers=broker.bootstrap_servers, linger_ms=5)
        futures = [
            producer.send(
                names["frames"],
                key=f.camera.encode(),
                value=f.value,
                headers=[("content-type", b"image/png")] if f.image is not None else [],
            )
            for f in stream
        ]
        producer.flush()
        producer.close()
        truth: dict[tuple[int, int], DemoFrame] = {}
        for f, fut in zip(stream, futures, strict=True):
            meta = fut.get(timeout=30)
            truth[(meta.partition, meta.offset)] = f
        n_frames = sum(f.image is not None for f in stream)
        log(
            f"published {len(stream)} messages to {names['frames']}: {n_frames} frames from "
            f"{len({f.camera for f in stream})} cameras, {len(stream) - n_frames} corrupt"
        )

        settings = RunSettings.model_validate(
            {
                "topic": [names["frames"]],
                "model": model,
                "group_id": "sdns-demo",
                "bootstrap_servers": broker.bootstrap_servers,
                "alert_topic": names["alerts"],
                "dlq_topic": names["dlq"],
                "scores_topic": names["scores"],
                "from_beginning": True,
                "alarm_rate": alarm_rate,
                "metrics_port": None,
                "session_timeout_ms": 6000,
                "heartbeat_interval_ms": 1000,
                "batch_size": 128,
                "max_wait_ms": 50,
            }
        )
        monitor = StreamMonitor(settings)
        monitor.start()
        try:
            if not monitor.wait_ready(60):
                raise SdnsError("the demo's monitor did not join its group within 60 s")
            started = last_change = time.monotonic()
            done = 0
            while done < len(stream) and monitor.error is None:
                if monitor.stats.messages != done:
                    done, last_change = monitor.stats.messages, time.monotonic()
                elif time.monotonic() - last_change > 120:
                    raise SdnsError(
                        f"the demo stream stalled after {done} of {len(stream)} messages"
                    )
                if progress is not None:
                    progress(monitor.stats.frames, n_frames)
                time.sleep(0.05)
            seconds = time.monotonic() - started
        finally:
            stats = monitor.stop()
        if progress is not None:
            progress(stats.frames, n_frames)
        scores = _read_json(broker.bootstrap_servers, names["scores"], stats.frames)
        records = _read_json(broker.bootstrap_servers, names["alerts"], stats.alerts)
    rate = alarm_rate if alarm_rate is not None else monitor.detector.alarm_rate
    summary = _measure(truth, scores, records, stats.dead_letters, seconds, rate)
    summary.incidents_closed = stats.incidents_closed
    summary.report = write_report(workdir / "demo-report.html", summary, monitor.detector.name)
    return summary


def _read_json(bootstrap: str, topic: str, expect: int, timeout_ms: int = 10_000) -> list[Any]:
    from kafka import KafkaConsumer

    consumer = KafkaConsumer(
        topic,
        bootstrap_servers=bootstrap,
        group_id=None,
        auto_offset_reset="earliest",
        consumer_timeout_ms=timeout_ms,
    )
    out: list[Any] = []
    for m in consumer:
        out.append(json.loads(m.value))
        if len(out) >= expect:
            break
    consumer.close()
    return out


def _measure(
    truth: dict[tuple[int, int], DemoFrame],
    scores: list[dict[str, Any]],
    records: list[dict[str, Any]],
    dead_letters: int,
    seconds: float,
    alarm_rate: float,
) -> DemoSummary:
    per_kind: dict[str, Counter[str]] = {}
    thumbs: dict[str, list[tuple[np.ndarray, float, float]]] = {}
    tp = fp = fn = 0
    for s in scores:
        frame = truth[(s["source"]["partition"], s["source"]["offset"])]
        counts = per_kind.setdefault(frame.kind, Counter())
        counts["frames"] += 1
        flagged = bool(s["flagged"])
        counts["flagged"] += flagged
        tp += flagged and frame.ood
        fp += flagged and not frame.ood
        fn += (not flagged) and frame.ood
        if flagged and frame.image is not None:
            thumbs.setdefault(frame.kind, []).append((frame.image, s["score"], s["p_value"]))
    alerts = [r for r in records if r.get("kind") in ("alert", "camera-alarm")]
    alert_ood = [truth[(a["source"]["partition"], a["source"]["offset"])].ood for a in alerts]
    # A camera's frames in order (one partition per key), and where its first alert came.
    order: dict[str, list[int]] = {}
    for (_partition, offset), f in sorted(truth.items()):
        if f.image is not None:
            order.setdefault(f.camera, []).append(offset)
    first: dict[str, int] = {}
    for a in alerts:
        camera, offset = a["source"]["key"], a["source"]["offset"]
        if camera in order and offset in order[camera]:
            first[camera] = min(first.get(camera, 10**9), order[camera].index(offset) + 1)
    id_counts = per_kind.get("fashion-mnist", Counter())
    return DemoSummary(
        frames=len(scores),
        dead_letters=dead_letters,
        alerts=len(alerts),
        incidents_closed=0,
        seconds=seconds,
        frames_per_second=len(scores) / max(seconds, 1e-9),
        alarm_rate=alarm_rate,
        per_kind={k: dict(v) for k, v in per_kind.items()},
        flagged_precision=tp / max(tp + fp, 1),
        flagged_recall=tp / max(tp + fn, 1),
        alert_precision=sum(alert_ood) / max(len(alerts), 1),
        cameras_alerted={c: first.get(c) for c in sorted(order)},
        false_alarm_rate=id_counts["flagged"] / max(id_counts["frames"], 1),
        thumbnails=thumbs,
    )


def summary_rows(s: DemoSummary) -> list[tuple[str, str]]:
    """The summary table as (what, value) rows, for the terminal and the report."""
    ood = {f for f in OOD_KINDS.values()}
    healthy = [c for c, n in s.cameras_alerted.items() if c not in ood and n is not None]
    cams = ", ".join(
        f"{c} {'NO' if n is None else f'after {n} frames'}"
        for c, n in s.cameras_alerted.items()
        if c in ood
    )
    return [
        ("frames scored", f"{s.frames}"),
        ("dead letters (corrupt messages)", f"{s.dead_letters}"),
        ("alarm rate (p-value below)", f"{s.alarm_rate:g}"),
        (
            "flagged frames: precision / recall",
            f"{s.flagged_precision:.3f} / {s.flagged_recall:.3f}",
        ),
        ("false alarms among in-distribution frames", f"{s.false_alarm_rate:.3f}"),
        ("alerts published (camera alarms and reminders)", f"{s.alerts}"),
        ("alerts on out-of-distribution frames", f"{s.alert_precision:.3f}"),
        ("healthy cameras alerted", ", ".join(healthy) or "none"),
        ("out-of-distribution cameras alerted", cams),
        (
            "end-to-end frames/s (consume, decode, score, produce, commit)",
            f"{s.frames_per_second:.0f}",
        ),
    ]


def write_report(path: Path, s: DemoSummary, model_name: str, per_kind_max: int = 48) -> Path:
    """A self-contained HTML page: the summary, per-source flag rates, flagged thumbnails."""
    rows = "".join(
        f"<tr><td>{html.escape(k)}</td><td>{html.escape(v)}</td></tr>" for k, v in summary_rows(s)
    )
    kinds = "".join(
        f"<tr><td>{html.escape(kind)}</td><td>{'out' if kind != 'fashion-mnist' else 'in'}</td>"
        f"<td>{c.get('frames', 0)}</td><td>{c.get('flagged', 0)}</td>"
        f"<td>{c.get('flagged', 0) / max(c.get('frames', 0), 1):.3f}</td></tr>"
        for kind, c in sorted(s.per_kind.items())
    )
    sections = []
    for kind, items in sorted(s.thumbnails.items()):
        items = sorted(items, key=lambda t: -t[1])[:per_kind_max]
        imgs = "".join(
            f'<figure><img src="data:image/png;base64,'
            f'{base64.b64encode(_png(image, 3)).decode()}" alt="{html.escape(kind)}">'
            f"<figcaption>{score:.2f}<br>p={p:.3g}</figcaption></figure>"
            for image, score, p in items
        )
        sections.append(
            f"<h2>Flagged: {html.escape(kind)} ({len(s.thumbnails[kind])}, highest scores "
            f"first)</h2><div class=grid>{imgs}</div>"
        )
    page = f"""<!doctype html><html><head><meta charset="utf-8">
<title>sdns-monitor demo</title><style>
body {{ font-family: system-ui, sans-serif; margin: 2em; color: #222; }}
table {{ border-collapse: collapse; margin-bottom: 1.5em; }}
td, th {{ border: 1px solid #ccc; padding: 4px 10px; text-align: left; }}
.grid {{ display: flex; flex-wrap: wrap; gap: 6px; }}
figure {{ margin: 0; text-align: center; font-size: 11px; }}
img {{ image-rendering: pixelated; border: 1px solid #999; }}
</style></head><body>
<h1>sdns-monitor demo: model {html.escape(model_name)}</h1>
<table>{rows}</table>
<table><tr><th>source</th><th>distribution</th><th>frames</th><th>flagged</th><th>rate</th></tr>
{kinds}</table>
{"".join(sections)}
</body></html>
"""
    path.write_text(page)
    return path
