"""Frames already on a Kafka topic, read as a data set: ``kafka://HOST:PORT/TOPIC?max=N``.

So that `fit`, `eval` and `score` take what a camera actually publishes. The topic is read
without a consumer group (partitions are assigned directly, nothing is committed, no other
consumer is disturbed), from the earliest offsets up to the end (high watermark) each partition
has when reading starts: a snapshot, not a wait for frames still to come.

Frames are decoded by `frames.decode_bytes`, the decoder `run` uses, so an image read here gets
the pixels it gets when it is scored on the stream; an `.npy` message of N frames gives N images.
Messages that do not decode are skipped and counted in one warning. Channels and sizes follow
``folder:`` specs: grayscale when every frame is, else RGB (alpha dropped); with a size every
frame is resized to it, without one they must all share one shape.

With ``max=N`` fewer frames than the topic holds are taken, round-robin over the partitions
(the first frame of each partition, then the second, ...), so that every camera (key) is
represented; the choice depends only on what the topic holds, not on the order in which the
broker answers fetches, so two reads of the same topic give the same images.

The connection is secured as `run`'s is, by the same environment variables:
``SDNS_SECURITY_PROTOCOL`` (PLAINTEXT, SSL, SASL_PLAINTEXT, SASL_SSL; default PLAINTEXT),
``SDNS_SASL_MECHANISM``, ``SDNS_SASL_PLAIN_USERNAME``, ``SDNS_SASL_PLAIN_PASSWORD``,
``SDNS_SSL_CAFILE``, ``SDNS_SSL_CERTFILE``, ``SDNS_SSL_KEYFILE`` and ``SDNS_SSL_PASSWORD``
(`sdns_monitor.settings.KafkaSecurity`), checked before connecting: a bad value or combination
is a ConfigError. Nothing of it goes in the spec, so no secret shows in a command line.
"""

from __future__ import annotations

import bisect
import logging
import os
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from sdns_monitor.errors import ConfigError, DataError, FrameError
from sdns_monitor.frames import decode_bytes
from sdns_monitor.preprocess import resize_uint8
from sdns_monitor.settings import KafkaSecurity, security_from_env

log = logging.getLogger(__name__)

_POLL_MS = 200
_MAX_MESSAGE_BYTES = 16 * 1024 * 1024  # as `run --max-frame-bytes` by default


@dataclass(frozen=True)
class TopicImages:
    """Frames of a topic (uint8 N x H x W x C, C in 1, 3), their origins, and how many
    messages were skipped as undecodable."""

    images: np.ndarray
    sources: list[str]  # "topic:partition:offset", with "#i" for frame i of a batch message
    skipped: int


@dataclass
class _Partition:
    """What has been read of one partition: frames (in offset order) and where it ends.

    `end` is the high watermark of the partition's first fetch response, and no less than
    `listed_end`, the ListOffsets answer: Tansu 0.6 answers the last record batch's base
    offset + 1 there, short of the true end when that batch holds several records, while its
    fetch responses carry the true high watermark.
    """

    listed_end: int
    frames: list[np.ndarray] = field(default_factory=list)
    sources: list[str] = field(default_factory=list)
    end: int | None = None  # known from the first fetch response
    done: bool = False


def load_topic(
    servers: str,
    topic: str,
    *,
    max_frames: int | None,
    timeout_s: float,
    spec: str,
    size: int | None = None,
    security: KafkaSecurity | None = None,
) -> TopicImages:
    """Read up to `max_frames` decodable frames (None: all) of `topic` on `servers`, connecting
    with `security` (None: from the SDNS_* variables, `settings.security_from_env`).

    Raises ConfigError when those variables are invalid, DataError when the broker does not
    answer, the topic does not exist or is empty, none of its messages is an image, or the read
    does not finish within `timeout_s`.
    """
    from kafka import KafkaConsumer, TopicPartition
    from kafka.errors import KafkaError

    if security is None:
        try:
            security = security_from_env(os.environ)
        except ConfigError as exc:
            raise ConfigError(f"{spec}: {exc}") from None
    deadline = time.monotonic() + timeout_s

    def left_ms() -> int:
        return max(1, int((deadline - time.monotonic()) * 1000))

    try:
        consumer = KafkaConsumer(
            bootstrap_servers=servers.split(","),
            group_id=None,
            enable_auto_commit=False,
            auto_offset_reset="earliest",
            allow_auto_create_topics=False,
            client_id="sdns-monitor-dataset",
            bootstrap_timeout_ms=left_ms(),
            request_timeout_ms=min(max(2000, left_ms()), 300_000),
            fetch_max_wait_ms=100,
            max_partition_fetch_bytes=_MAX_MESSAGE_BYTES + 1024,
            **security.client_options(),
        )
    except (KafkaError, OSError) as exc:
        raise DataError(
            f"{spec}: no Kafka broker answered at {servers} within {timeout_s:g} s ({exc}); "
            "check the address and that the broker runs, or raise timeout_s"
        ) from None
    try:
        numbers = sorted(consumer.partitions_for_topic(topic))
        if not numbers:
            known = ", ".join(sorted(consumer.topics())[:10]) or "none"
            raise DataError(
                f"{spec}: topic {topic!r} does not exist on {servers} (topics there: {known}); "
                "check the name"
            )
        tps = [TopicPartition(topic, p) for p in numbers]
        consumer.assign(tps)
        begin = consumer.beginning_offsets(tps, timeout_ms=left_ms())
        end = consumer.end_offsets(tps, timeout_ms=left_ms())
        parts = {tp.partition: _Partition(end[tp]) for tp in tps}
        for tp in tps:
            consumer.seek(tp, begin[tp])
            parts[tp.partition].done = begin[tp] >= end[tp]
        if all(p.done for p in parts.values()):
            raise DataError(
                f"{spec}: topic {topic!r} holds no messages; publish frames to it first "
                "(e.g. examples/camera_simulator.py)"
            )
        n_messages, skipped, first_problem = _read(consumer, parts, max_frames, deadline)
        if _hungry(parts, max_frames):  # the deadline came first
            raise DataError(
                f"{spec}: {n_messages} messages read, and {topic!r} goes on after {timeout_s:g} "
                "s; raise timeout_s, or set max=N to take fewer frames"
            )
    except KafkaError as exc:
        raise DataError(
            f"{spec}: reading {topic!r} from {servers} failed ({exc}); check the broker, or "
            "raise timeout_s"
        ) from None
    finally:
        consumer.close()

    if skipped:
        log.warning(
            "%s: skipped %d of %d messages read that are not images (first: %s)",
            spec,
            skipped,
            n_messages,
            first_problem,
        )
    take = _round_robin([len(p.frames) for p in parts.values()], max_frames)
    frames = [f for p, n in zip(parts.values(), take, strict=True) for f in p.frames[:n]]
    sources = [s for p, n in zip(parts.values(), take, strict=True) for s in p.sources[:n]]
    if not frames:
        raise DataError(
            f"{spec}: none of the {n_messages} messages on {topic!r} is an image "
            f"(first: {first_problem}); publish JPEG, PNG, WebP or .npy frames"
        )
    return TopicImages(_stack(frames, size, spec), sources, skipped)


def _read(
    consumer: Any, parts: dict[int, _Partition], max_frames: int | None, deadline: float
) -> tuple[int, int, str | None]:
    """Poll until every partition is at its end or has given its share of `max_frames`, or the
    deadline passes. Returns (messages read, messages skipped, the first skip's reason)."""
    messages, skipped, first_problem = 0, 0, None
    by_number = {tp.partition: tp for tp in consumer.assignment()}
    while time.monotonic() < deadline:
        hungry = _hungry(parts, max_frames)
        if not hungry:
            break
        # Partitions that already hold their share wait, so the others are not starved.
        consumer.pause(*(tp for n, tp in by_number.items() if n not in hungry))
        consumer.resume(*(by_number[n] for n in hungry))
        wait = min(_POLL_MS, max(1, int((deadline - time.monotonic()) * 1000)))
        for tp, records in consumer.poll(timeout_ms=wait).items():
            part = parts[tp.partition]
            if part.end is None:
                part.end = max(consumer.highwater(tp) or 0, part.listed_end)
            for record in records:
                if record.offset >= part.end:
                    break
                messages += 1
                try:
                    headers = dict(record.headers or [])
                    kind = headers.get("content-type")
                    decoded = decode_bytes(
                        record.value or b"", kind.decode("latin-1") if kind else None
                    )
                except FrameError as exc:
                    skipped += 1
                    first_problem = first_problem or f"offset {tp.partition}:{record.offset}: {exc}"
                    continue
                for i, frame in enumerate(decoded):
                    part.frames.append(_rgb_or_gray(frame))
                    where = f"{tp.topic}:{tp.partition}:{record.offset}"
                    part.sources.append(where if len(decoded) == 1 else f"{where}#{i}")
        for n, part in parts.items():
            tp = by_number[n]
            if part.done or consumer.highwater(tp) is None:
                continue  # not fetched yet
            if part.end is None:
                part.end = max(consumer.highwater(tp), part.listed_end)
            # The position, not the last record, says where a partition is: transaction
            # markers and compacted offsets hold no record.
            part.done = consumer.position(tp) >= part.end
    return messages, skipped, first_problem


def _hungry(parts: dict[int, _Partition], max_frames: int | None) -> set[int]:
    """Partitions still to be read: not at their end and below the round-robin share they
    may have to give (`_level`, counting every unfinished partition as unbounded)."""
    level = _level(
        [len(p.frames) if p.done else None for p in parts.values()],
        max_frames,
    )
    return {n for n, p in parts.items() if not p.done and len(p.frames) < level}


def _level(counts: list[int | None], want: int | None) -> float:
    """The fewest round-robin rounds that reach `want` frames, where a count of None is a
    partition with no end; infinite when `want` is None or cannot be reached."""
    if want is None:
        return float("inf")
    finite = sorted(c for c in counts if c is not None)
    unbounded = len(counts) - len(finite)
    if sum(finite) < want and unbounded == 0:
        return float("inf")
    # sum(min(c, L)) over the partitions grows with L; find the first L reaching `want`.
    low, high = 0, want
    while low < high:
        mid = (low + high) // 2
        below = bisect.bisect_left(finite, mid)
        total = sum(finite[:below]) + mid * (len(finite) - below + unbounded)
        if total >= want:
            high = mid
        else:
            low = mid + 1
    return float(low)


def _round_robin(counts: list[int], want: int | None) -> list[int]:
    """How many frames to take from each partition: the first of every partition, then the
    second, ... (in partition order) until `want` frames (None: all of them).

    >>> _round_robin([5, 1, 3], 6)
    [3, 1, 2]
    """
    if want is None or sum(counts) <= want:
        return list(counts)
    rounds = int(_level(list(counts), want))
    take = [min(c, rounds - 1) for c in counts]  # the full rounds
    extra = want - sum(take)
    for i, c in enumerate(counts):  # the last, partial round
        if extra and c >= rounds:
            take[i] += 1
            extra -= 1
    return take


def _rgb_or_gray(frame: np.ndarray) -> np.ndarray:
    """H x W x 1 for grayscale, H x W x 3 otherwise (alpha dropped), as `folder` does."""
    return frame if frame.shape[-1] in (1, 3) else np.ascontiguousarray(frame[..., :3])


def _stack(frames: list[np.ndarray], size: int | None, spec: str) -> np.ndarray:
    """One uint8 N x H x W x C array: gray repeated to RGB unless every frame is gray; resized
    to `size` when given (frames of one shape together), else all frames must share a shape."""
    if any(f.shape[-1] == 3 for f in frames):
        frames = [np.repeat(f, 3, axis=-1) if f.shape[-1] == 1 else f for f in frames]
    shapes = {f.shape for f in frames}
    if size is None:
        if len(shapes) > 1:
            raise DataError(
                f"{spec}: frames have {len(shapes)} different sizes (e.g. "
                f"{', '.join(f'{s[1]}x{s[0]}' for s in sorted(shapes)[:3])}); pass a size to "
                "resize them all (fit: --image-size)"
            )
        return np.stack(frames)
    out = np.empty((len(frames), size, size, frames[0].shape[-1]), np.uint8)
    for shape in shapes:
        idx = [i for i, f in enumerate(frames) if f.shape == shape]
        out[idx] = resize_uint8(np.stack([frames[i] for i in idx]), size)
    return out
