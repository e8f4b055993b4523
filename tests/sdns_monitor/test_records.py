"""Record contracts of DESIGN.md: alert, scores, incident closing, dead-letter headers."""

from __future__ import annotations

import base64
import json

import pytest
from pydantic import ValidationError

from sdns_monitor.errors import FrameError
from sdns_monitor.records import (
    DLQ_HEADERS,
    SCHEMA_VERSION,
    Alert,
    IncidentRef,
    ModelRef,
    ScoreRecord,
    Source,
    dead_letter_headers,
    encode_key,
)

SOURCE = Source(
    topic="frames", partition=2, offset=41, key="cam1", key_encoding="utf-8", timestamp_ms=5
)
MODEL = ModelRef(hash="ab" * 32, name="cam1")


def test_alert_json_has_the_contract_fields() -> None:
    alert = Alert(
        source=SOURCE,
        score=7.5,
        p_value=0.001,
        alarm_rate=0.01,
        model=MODEL,
        detected_at_ms=9,
        incident=IncidentRef(id="cam1-9", opened_at_ms=9, frames=1, alerts=1),
    )
    data = json.loads(alert.model_dump_json())
    assert data["schema_version"] == SCHEMA_VERSION and data["kind"] == "alert"
    assert set(data) >= {
        "source",
        "score",
        "p_value",
        "alarm_rate",
        "threshold",
        "model",
        "detected_at_ms",
        "incident",
    }
    assert data["source"] == {
        "topic": "frames",
        "partition": 2,
        "offset": 41,
        "frame_index": 0,
        "key": "cam1",
        "key_encoding": "utf-8",
        "timestamp_ms": 5,
    }
    assert Alert.model_validate_json(alert.model_dump_json()) == alert


def test_records_refuse_unknown_fields() -> None:
    with pytest.raises(ValidationError):
        ScoreRecord.model_validate(
            {
                "source": SOURCE.model_dump(),
                "score": 1.0,
                "p_value": 0.5,
                "flagged": False,
                "model": MODEL.model_dump(),
                "extra": 1,
            }
        )


def test_keys_are_utf8_or_lossless_base64() -> None:
    assert encode_key(None) == (None, None)
    assert encode_key("kamera-ü".encode()) == ("kamera-ü", "utf-8")
    raw = b"\xff\x00\xfe"
    text, encoding = encode_key(raw)
    assert encoding == "base64" and text is not None and base64.b64decode(text) == raw


def test_dead_letter_headers_keep_the_originals_and_say_why() -> None:
    original = [("content-type", b"image/png"), ("trace", b"\x00\x01")]
    headers = dead_letter_headers(original, FrameError("truncated PNG\nsecond line"), SOURCE)
    assert headers[:2] == original
    ours = dict(headers[2:])
    assert tuple(ours) == DLQ_HEADERS
    assert ours["sdns-error-class"] == b"FrameError"
    assert ours["sdns-error"] == b"truncated PNG second line"
    assert (ours["sdns-source-topic"], ours["sdns-source-partition"]) == (b"frames", b"2")
    assert (ours["sdns-source-offset"], ours["sdns-frame-index"]) == (b"41", b"0")


def test_a_key_over_the_bound_is_carried_as_its_digest_everywhere() -> None:
    import hashlib

    from sdns_monitor.records import MAX_KEY_BYTES, decode_key, encode_key, output_key

    short, long = b"cam-1", b"k" * (MAX_KEY_BYTES + 1)
    assert encode_key(short) == ("cam-1", "utf-8") and output_key(short) == short
    text, encoding = encode_key(long)
    assert (text, encoding) == (hashlib.sha256(long).hexdigest(), "sha256")
    assert output_key(long) == b"sha256:" + text.encode()
    assert decode_key(text, encoding) == output_key(long)  # closings keyed like the alerts
    assert output_key(b"k" * MAX_KEY_BYTES) == b"k" * MAX_KEY_BYTES  # the bound itself passes
