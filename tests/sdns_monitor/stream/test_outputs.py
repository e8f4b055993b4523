"""Records refused for good are replaced, not retried forever; transient failures are retried."""

from __future__ import annotations

from kafka.errors import KafkaTimeoutError

from sdns_monitor.records import MAX_KEY_BYTES
from sdns_monitor.stream.scorer import Scorer
from tests.sdns_monitor.stream.fakes import Message, Producer, batch, png, settings

BIG = b"x" * 5000


def _scorer() -> Scorer:
    return Scorer(settings(alerts="frames"), lambda batch: None)


def test_a_dead_letter_too_large_for_the_client_goes_as_a_reference() -> None:
    scorer, producer = _scorer(), Producer(too_large=4000)
    b = batch([Message("frames", 2, 7, BIG)])  # not an image, and too large to copy
    scorer.score_batch(b, producer)
    (dead,) = producer.to("sdns-dead-letters")
    assert dead.value is None and dead.key == b""
    headers = dict(dead.headers or [])
    assert headers["sdns-source-offset"] == b"7" and headers["sdns-source-partition"] == b"2"
    b.scored.set()
    assert b.error is None and b.delivered() is True and b.refused == {"sdns-dead-letters": 1}


def test_a_dead_letter_the_broker_refuses_is_replaced_by_a_reference_on_recovery() -> None:
    scorer, producer = _scorer(), Producer(broker_limit=4000)
    b = batch([Message("frames", 0, 3, BIG)])
    scorer.score_batch(b, producer)
    b.scored.set()
    assert b.delivered() is False  # the topic's max.message.bytes said no
    assert scorer.outputs.recover(b, producer)
    assert b.delivered() is True
    reference = producer.to("sdns-dead-letters")[-1]
    assert reference.value is None and dict(reference.headers or [])["sdns-source-offset"] == b"3"


def test_a_transient_failure_is_not_recovered_but_retried() -> None:
    scorer, producer = _scorer(), Producer(refuse={"scores"})  # a KafkaError, not a refusal
    b = batch([Message("frames", 0, 0, png(20))])
    scorer.score_batch(b, producer)
    b.scored.set()
    assert b.delivered() is False and not scorer.outputs.recover(b, producer)


def test_a_send_error_that_is_not_a_refusal_still_fails_the_batch() -> None:
    scorer, producer = _scorer(), Producer()
    producer.raise_on_send = KafkaTimeoutError("no metadata")
    b = batch([Message("frames", 0, 0, png(20))])
    scorer.score_batch(b, producer)
    assert b.error is not None and "KafkaTimeoutError" in str(b.error)


def test_records_about_a_huge_key_carry_its_digest_and_stay_small() -> None:
    scorer, producer = _scorer(), Producer()
    key = b"k" * 400_000
    b = batch([Message("frames", 0, 0, png(250), key=key)])
    scorer.score_batch(b, producer)
    (alert,) = producer.to("sdns-alerts")
    assert alert.key is not None and alert.key.startswith(b"sha256:") and len(alert.key) == 71
    assert alert.value is not None and len(alert.value) < 2 * MAX_KEY_BYTES
    (score,) = producer.to("scores")
    assert score.key == alert.key  # one camera's records share a key, hence a partition


def test_junk_frames_of_one_kind_share_one_log_kind() -> None:
    import random

    scorer, producer = _scorer(), Producer()
    rng = random.Random(0)
    junk = [bytes(rng.randrange(256) for _ in range(12)) for _ in range(2000)]
    junk = [j for j in junk if not j.startswith((b"\x89PNG", b"\xff\xd8\xff", b"\x93NUMPY"))]
    b = batch([Message("frames", 0, i, j) for i, j in enumerate(junk)])
    scorer.score_batch(b, producer)
    assert len(producer.to("sdns-dead-letters")) == len(junk)
    kinds = scorer.outputs._log_throttle._last
    assert len(kinds) <= 3, sorted(kinds)[:5]  # 2,000 junk frames once made 1,997 kinds
