"""Decoding messages into frames, and when a batch counts as delivered (no Kafka)."""

from __future__ import annotations

import gc
import io
import weakref

import numpy as np
import pytest

from sdns_monitor.stream import batch as batch_module
from sdns_monitor.stream.batch import Batch, DecodeLimits, decode_messages
from tests.sdns_monitor.stream.fakes import Future, Message, models, png, settings


def _npy(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, array)
    return buf.getvalue()


def test_frames_keep_where_they_came_from_and_bad_messages_say_why() -> None:
    stack = np.zeros((3, 4, 4, 1), np.uint8)
    messages = [
        Message("frames", 0, 10, png(200), key=b"cam-1"),
        Message("frames", 0, 11, b"", key=b"cam-2"),
        Message("frames", 1, 12, _npy(stack), key=b"\xff\xfe"),  # a key that is not UTF-8
        Message("frames", 1, 13, b"x" * 1001, key=None),
    ]
    decoded = decode_messages(messages, models(), DecodeLimits(max_frame_bytes=1000))
    assert [(f.source.offset, f.source.frame_index) for f in decoded.frames] == [
        (10, 0),
        (12, 0),
        (12, 1),
        (12, 2),
    ]
    first = decoded.frames[0]
    assert first.image.shape == (1, 4, 4, 1) and first.image.mean() == 200
    assert first.key == b"cam-1" and first.source.key == "cam-1"
    assert decoded.frames[1].source.key_encoding == "base64"
    assert decoded.frames[1].key == b"\xff\xfe"  # outputs are keyed by the key as it came
    reasons = {bad.source.offset: str(bad.error) for bad in decoded.undecodable}
    assert reasons[11].startswith("empty message value")
    assert reasons[13] == "message of 1001 bytes exceeds --max-frame-bytes 1000"


def test_the_content_type_header_is_named_when_the_bytes_are_no_image() -> None:
    message = Message("frames", 0, 0, b"hello", headers=[("content-type", b"image/jpeg")])
    (bad,) = decode_messages([message], models(), DecodeLimits()).undecodable
    assert "content-type says 'image/jpeg'" in str(bad.error)


def test_a_batch_is_delivered_once_scored_and_every_record_acknowledged() -> None:
    batch = Batch([Message("frames", 0, 0, b"x")], models=None, generation=0)
    first, second = Future(), Future()
    batch.futures += [first, second]
    assert batch.delivered() is None  # not scored yet
    batch.scored.set()
    first.succeed()
    assert batch.delivered() is None  # a record still pending
    second.succeed()
    assert batch.delivered() is True
    second.fail("too large")
    assert batch.delivered() is False
    assert batch.failure() == "1 of 2 records were not delivered (KafkaError: too large)"


def test_whatever_one_message_raises_is_that_messages_dead_letter(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    def exhausted(*args: object, **kwargs: object) -> np.ndarray:
        raise MemoryError("decoding needed 1.2 GiB")

    monkeypatch.setattr(batch_module, "decode_bytes", exhausted)
    messages = [Message("frames", 0, 0, png(1)), Message("frames", 0, 1, png(2))]
    decoded = decode_messages(messages, models(), DecodeLimits())
    assert [type(bad.error).__name__ for bad in decoded.undecodable] == ["MemoryError"] * 2
    assert decoded.frames == []


def test_limits_come_from_the_settings_and_reach_the_decoder() -> None:
    limits = DecodeLimits.of(settings(max_pixels=100, max_frames_per_message=2))
    assert (limits.max_pixels, limits.max_frames, limits.reduced_jpeg) == (100, 2, True)
    big = Message("frames", 0, 0, png(1, size=11))  # 121 pixels
    many = Message("frames", 0, 1, _npy(np.zeros((3, 2, 2, 1), np.uint8)))
    reasons = [str(b.error) for b in decode_messages([big, many], models(), limits).undecodable]
    assert "exceeds max_pixels=100" in reasons[0]
    assert "more than max_frames_per_message=2" in reasons[1]
    assert not DecodeLimits.of(settings(full_jpeg_decode=True)).reduced_jpeg


def test_a_bad_message_does_not_keep_its_batch_alive_after_use() -> None:
    # The dead letter keeps the exception; its traceback must not keep decode_messages' frame,
    # and with it every frame of the batch, alive until a full garbage collection.
    messages = [Message("frames", 0, 1, png(100)), Message("frames", 0, 2, b"\x00junk")]
    enabled = gc.isenabled()
    gc.disable()
    try:
        decoded = decode_messages(messages, models(), DecodeLimits())
        assert len(decoded.undecodable) == 1
        source = weakref.ref(decoded.frames[0].source)
        del decoded, messages
        assert source() is None  # freed by reference counting alone
    finally:
        if enabled:
            gc.enable()
