"""The records `run` produces (DESIGN.md "Contracts"): alerts, per-frame scores, incident
closings and dead letters. JSON via pydantic, each with a `schema_version`.
"""

from __future__ import annotations

import base64
import hashlib
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

SCHEMA_VERSION = 2  # 2: camera alarms (camera-alarm, -cleared, -silent); incident ids without keys

# Headers a dead letter carries besides the original message's own.
DLQ_HEADERS = (
    "sdns-error-class",
    "sdns-error",
    "sdns-source-topic",
    "sdns-source-partition",
    "sdns-source-offset",
    "sdns-frame-index",
)


# How `key` holds the message key: its text, its bytes in base64 (not UTF-8), or, for a key
# longer than MAX_KEY_BYTES, the hex SHA-256 of its bytes (outputs are keyed `sha256:HEX`).
KeyEncoding = Literal["utf-8", "base64", "sha256"]
MAX_KEY_BYTES = 1024


class Source(BaseModel):
    """Where a frame came from."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    topic: str
    partition: int
    offset: int
    frame_index: int = 0  # index within the message when it held a batch of frames
    key: str | None = None
    key_encoding: KeyEncoding | None = None
    timestamp_ms: int | None = None


class ModelRef(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    hash: str
    name: str


class IncidentRef(BaseModel):
    """The incident an alert belongs to (per key: flagged frames within a window)."""

    model_config = ConfigDict(extra="forbid")
    id: str
    opened_at_ms: int
    frames: int = Field(ge=1)  # flagged frames in the incident so far
    alerts: int = Field(ge=1)  # alerts sent for it so far, this one included


class Alert(BaseModel):
    model_config = ConfigDict(extra="forbid")
    schema_version: int = SCHEMA_VERSION
    kind: Literal["alert"] = "alert"
    source: Source
    score: float
    p_value: float
    alarm_rate: float | None = None
    threshold: float | None = None
    model: ModelRef
    detected_at_ms: int
    incident: IncidentRef | None = None


class ScoreRecord(BaseModel):
    model_config = ConfigDict(extra="forbid")
    schema_version: int = SCHEMA_VERSION
    source: Source
    score: float
    p_value: float
    flagged: bool
    model: ModelRef


class IncidentClosed(BaseModel):
    """Sent on the alert topic when a key has had no flagged frame for a whole window."""

    model_config = ConfigDict(extra="forbid")
    schema_version: int = SCHEMA_VERSION
    kind: Literal["incident-closed"] = "incident-closed"
    key: str | None
    key_encoding: KeyEncoding | None = None
    incident_id: str
    opened_at_ms: int
    closed_at_ms: int
    frames: int
    alerts: int


class AlarmRef(BaseModel):
    """A camera's alarm: open from the frame that crossed the threshold until it clears."""

    model_config = ConfigDict(extra="forbid")
    id: str  # DIGEST@PARTITION:OFFSET of the opening frame: the same after a restart or replay
    opened_at_ms: int  # event time (the opening frame's timestamp)
    first_frame: Source  # where the change most likely began (the CUSUM's last zero)
    evidence: float  # the test statistic when this record was made (nats)
    threshold: float  # the statistic's alarm level, log of the expected run between false alarms
    frames: int = Field(ge=1)  # frames of the camera since the alarm opened, this one included
    alerts: int = Field(ge=1)  # alerts sent for it so far, this one included


class CameraAlert(BaseModel):
    """A camera's frames stopped looking like the reference: its alarm opened (or, with
    `reminder`, is still open a cooldown later). Keyed by the camera's key."""

    model_config = ConfigDict(extra="forbid")
    schema_version: int = SCHEMA_VERSION
    kind: Literal["camera-alarm"] = "camera-alarm"
    source: Source  # the frame that opened the alarm, or the latest one for a reminder
    score: float
    p_value: float
    model: ModelRef
    detected_at_ms: int  # wall clock
    reminder: bool = False
    alarm: AlarmRef


class CameraCleared(BaseModel):
    """The camera's frames look normal again: its alarm closed."""

    model_config = ConfigDict(extra="forbid")
    schema_version: int = SCHEMA_VERSION
    kind: Literal["camera-cleared"] = "camera-cleared"
    key: str | None
    key_encoding: KeyEncoding | None = None
    alarm_id: str
    opened_at_ms: int
    cleared_at_ms: int  # event time of the frame that cleared it
    source: Source  # that frame
    frames: int  # frames of the camera while the alarm was open
    alerts: int


class CameraSilent(BaseModel):
    """No frame from a camera for `silent_after_s` of the monitor's own clock (event time does
    not move for a dead camera). Sent once per silence."""

    model_config = ConfigDict(extra="forbid")
    schema_version: int = SCHEMA_VERSION
    kind: Literal["camera-silent"] = "camera-silent"
    key: str | None
    key_encoding: KeyEncoding | None = None
    last_frame: Source
    silent_s: float
    detected_at_ms: int


def encode_key(key: bytes | None) -> tuple[str | None, KeyEncoding | None]:
    """A message key as text: UTF-8 when it decodes, else base64 (never lossy); a key over
    MAX_KEY_BYTES as its SHA-256 (records stay small whatever a producer sends)."""
    if key is None:
        return None, None
    if len(key) > MAX_KEY_BYTES:
        return hashlib.sha256(key).hexdigest(), "sha256"
    try:
        return key.decode("utf-8"), "utf-8"
    except UnicodeDecodeError:
        return base64.b64encode(key).decode("ascii"), "base64"


def output_key(key: bytes | None) -> bytes | None:
    """The Kafka key of the records a message causes: its own key, or `sha256:HEX` for a key
    over MAX_KEY_BYTES (so one camera's records still share a partition)."""
    if key is None or len(key) <= MAX_KEY_BYTES:
        return key
    return b"sha256:" + hashlib.sha256(key).hexdigest().encode("ascii")


def decode_key(key: str, encoding: str | None) -> bytes:
    """The Kafka key of a record about `key` (as `encode_key` wrote it): `output_key` of the
    message key it came from."""
    if encoding == "sha256":
        return b"sha256:" + key.encode("ascii")
    return base64.b64decode(key) if encoding == "base64" else key.encode("utf-8")


def to_json(record: BaseModel) -> bytes:
    """A record as the bytes of a Kafka message value."""
    return record.model_dump_json().encode()


def dead_letter_headers(
    original: list[tuple[str, bytes | None]] | None,
    error: BaseException,
    source: Source,
) -> list[tuple[str, bytes]]:
    """The original headers, then the sdns-* headers that say what went wrong. Kafka allows a
    null header value, which the producer cannot send: it is carried as empty bytes, and
    `sdns-null-headers` names those headers (comma-separated, in order)."""
    message = " ".join(str(error).split())[:1000]  # one line, bounded
    carried = [(k, b"" if v is None else v) for k, v in original or []]
    nulls = [k for k, v in original or [] if v is None]
    ours = [
        ("sdns-error-class", type(error).__name__),
        ("sdns-error", message),
        ("sdns-source-topic", source.topic),
        ("sdns-source-partition", str(source.partition)),
        ("sdns-source-offset", str(source.offset)),
        ("sdns-frame-index", str(source.frame_index)),
    ]
    if nulls:
        ours.append(("sdns-null-headers", ",".join(nulls)))
    return [*carried, *((k, v.encode("utf-8")) for k, v in ours)]
