"""A simulated camera: publishes image frames to a Kafka topic at a steady frame rate.

Each message is one encoded frame, keyed by the camera id, with a `content-type` header: the
frame format `sdns-monitor run` consumes (DESIGN.md "Frames"). Frames come from a folder of
image files (JPEG, PNG, WebP; sent as they are, in sorted order) or from a dataset spec
(`mnist:test`, `folder:/path`, ...; encoded as `--format`).

    python examples/camera_simulator.py --bootstrap-servers 127.0.0.1:9092 \\
        --topic camera-frames --camera cam-1 --frames data/cam1 --fps 10 --loop

Without `--loop` or `--count`, every frame is sent once. `--count N` sends exactly N frames,
starting over when the source runs out; `--loop` starts over until Ctrl-C. Frames are sent on
a fixed schedule (frame i at start + i / fps), so a slow send is caught up, not accumulated.
"""

from __future__ import annotations

import argparse
import io
import itertools
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

CONTENT_TYPES = {
    ".jpg": "image/jpeg",
    ".jpeg": "image/jpeg",
    ".png": "image/png",
    ".webp": "image/webp",
}
FORMATS = {"jpeg": "image/jpeg", "png": "image/png", "webp": "image/webp"}


def folder_frames(root: Path) -> list[tuple[bytes, str]]:
    """(bytes, content type) of every image file under `root`, in sorted path order."""
    files = sorted(p for p in root.rglob("*") if p.is_file() and p.suffix.lower() in CONTENT_TYPES)
    return [(p.read_bytes(), CONTENT_TYPES[p.suffix.lower()]) for p in files]


class SourceError(Exception):
    """The frames to send cannot be read."""


def spec_frames(spec: str, fmt: str, quality: int) -> list[tuple[bytes, str]]:
    """The images of a dataset spec, encoded as `fmt`."""
    from PIL import Image

    # Imported here, not at the top: sdns_monitor imports torch, which a folder does not need.
    from sdns_monitor.data import load_dataset
    from sdns_monitor.errors import SdnsError

    try:
        images = load_dataset(spec).images
    except SdnsError as exc:
        raise SourceError(str(exc)) from None
    out = []
    for image in images:
        buf = io.BytesIO()
        pil = Image.fromarray(image[..., 0] if image.shape[-1] == 1 else image)
        pil.save(buf, format=fmt.upper(), **({"quality": quality} if fmt != "png" else {}))
        out.append((buf.getvalue(), FORMATS[fmt]))
    return out


def schedule(
    frames: list[tuple[bytes, str]], count: int | None, loop: bool
) -> Iterator[tuple[bytes, str]]:
    """The frames to send, in order: once, N of them cycling, or forever."""
    if count is not None:
        return itertools.islice(itertools.cycle(frames), count)
    return itertools.cycle(frames) if loop else iter(frames)


def publish(
    producer: Any,
    topic: str,
    camera: str,
    frames: Iterator[tuple[bytes, str]],
    fps: float,
    log: Any = None,
) -> int:
    """Send the frames at `fps` (0: as fast as possible) until they run out or Ctrl-C; returns
    how many were delivered. Raises the first delivery error."""
    key = camera.encode("utf-8")
    failures: list[BaseException] = []
    start = time.monotonic()
    sent = 0
    try:
        for value, content_type in frames:
            if fps > 0:
                delay = start + sent / fps - time.monotonic()
                if delay > 0:
                    time.sleep(delay)
            headers = [("content-type", content_type.encode())]
            future = producer.send(topic, key=key, value=value, headers=headers)
            future.add_errback(failures.append)
            sent += 1
            if log is not None and sent % 100 == 0:
                log(f"{sent} frames sent")
    except KeyboardInterrupt:
        pass
    producer.flush()
    if failures:
        raise failures[0]
    return sent


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bootstrap-servers", default="localhost:9092")
    parser.add_argument("--topic", default="camera-frames")
    parser.add_argument("--camera", required=True, help="camera id: the message key")
    parser.add_argument(
        "--frames", required=True, help="a folder of image files, or a dataset spec"
    )
    parser.add_argument("--fps", type=float, default=10.0, help="frames per second; 0: no limit")
    repeat = parser.add_mutually_exclusive_group()
    repeat.add_argument("--loop", action="store_true", help="start over until Ctrl-C")
    repeat.add_argument("--count", type=int, help="send exactly N frames, cycling")
    parser.add_argument(
        "--format", choices=tuple(FORMATS), default="jpeg", help="encoding of dataset-spec frames"
    )
    parser.add_argument("--quality", type=int, default=90, help="JPEG/WebP quality")
    args = parser.parse_args(argv)
    if args.fps < 0 or (args.count is not None and args.count < 1):
        parser.error("--fps must be >= 0 and --count >= 1")

    from kafka import KafkaProducer
    from kafka.errors import KafkaError

    def log(message: str) -> None:
        print(message, file=sys.stderr, flush=True)

    source = Path(args.frames).expanduser()
    try:
        if source.is_dir():
            frames = folder_frames(source)
            if not frames:
                raise SourceError(f"no .jpg, .jpeg, .png or .webp files under {source}")
        else:
            frames = spec_frames(args.frames, args.format, args.quality)
        producer = KafkaProducer(bootstrap_servers=args.bootstrap_servers, linger_ms=0)
    except (SourceError, KafkaError, OSError) as exc:
        log(f"error: {exc}")
        return 1
    started = time.monotonic()
    try:
        sent = publish(
            producer,
            args.topic,
            args.camera,
            schedule(frames, args.count, args.loop),
            args.fps,
            log,
        )
    except KafkaError as exc:
        log(f"error: {exc}")
        return 1
    finally:
        producer.close()
    seconds = time.monotonic() - started
    log(f"sent {sent} frames of camera {args.camera} to {args.topic} in {seconds:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
