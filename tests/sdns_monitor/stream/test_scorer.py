"""The scorer with a fake producer and model: records, dead letters, incidents, generations."""

from __future__ import annotations

import json
import threading

import numpy as np
import pytest
from kafka.errors import KafkaTimeoutError

from sdns_monitor.errors import OutputError, ScoringUnavailable
from sdns_monitor.stream.batch import Batch, Decoded
from sdns_monitor.stream.incidents import incident_id
from sdns_monitor.stream.scorer import Scorer
from tests.sdns_monitor.stream.fakes import Detector, Message, Producer, batch, png, settings

DARK, BRIGHT = 20, 250  # scores 0.08 (p = 0.92) and 0.98 (p = 0.02 < 0.05: flagged)


def _scorer(**overrides: object) -> tuple[Scorer, list[Batch]]:
    """A scorer with frame incidents (`alerts = frames`): one flagged frame, one alert."""
    delivered: list[Batch] = []
    return Scorer(settings(alerts="frames", **overrides), delivered.append), delivered


def test_frames_become_score_records_in_offset_order_and_flagged_ones_alerts() -> None:
    scorer, _ = _scorer()
    producer = Producer()
    b = batch([Message("frames", 0, i, png(BRIGHT if i == 2 else DARK)) for i in range(4)])
    scorer.score_batch(b, producer)
    assert b.error is None
    assert [json.loads(s.value)["source"]["offset"] for s in producer.to("scores")] == [0, 1, 2, 3]
    (alert,) = producer.to("sdns-alerts")
    body = json.loads(alert.value)
    assert alert.key == b"cam-1" and body["source"]["offset"] == 2 and body["p_value"] < 0.05
    assert b.frames["frames"] == 4 and b.flagged["frames"] == 1 and len(b.alerts) == 1


def test_undecodable_messages_become_dead_letters_with_their_headers() -> None:
    scorer, _ = _scorer()
    producer = Producer()
    bad = Message("frames", 3, 9, b"not an image", headers=[("trace", b"abc")])
    b = batch([bad, Message("frames", 3, 10, png(DARK))])
    scorer.score_batch(b, producer)
    (dead,) = producer.to("sdns-dead-letters")
    headers = dict(dead.headers or [])
    assert dead.value == b"not an image" and headers["trace"] == b"abc"
    assert headers["sdns-source-offset"] == b"9" and headers["sdns-source-partition"] == b"3"
    assert b.dead_letters == {"FrameError": 1} and b.frames["frames"] == 1


def test_a_tombstone_and_null_header_values_still_make_dead_letters() -> None:
    scorer, _ = _scorer()
    producer = Producer()
    tombstone = Message("frames", 0, 4, None, key=None)
    nulls = Message("frames", 0, 5, b"junk", headers=[("a", None), ("b", b"x"), ("c", None)])
    b = batch([tombstone, nulls])
    scorer.score_batch(b, producer)
    assert b.error is None
    first, second = producer.to("sdns-dead-letters")
    assert first.key == b"" and first.value is None  # a record needs a key or a value
    assert dict(first.headers or [])["sdns-source-offset"] == b"4"
    headers = second.headers or []
    assert headers[:3] == [("a", b""), ("b", b"x"), ("c", b"")]
    assert dict(headers)["sdns-null-headers"] == b"a,c"


def test_a_frame_the_model_cannot_score_is_dead_lettered_and_the_rest_scored() -> None:
    scorer, _ = _scorer()
    producer = Producer()
    model = Detector(fail_on=BRIGHT / 255)
    b = batch(
        [Message("frames", 0, i, png(BRIGHT if i == 1 else DARK)) for i in range(3)], detector=model
    )
    scorer.score_batch(b, producer)
    (dead,) = producer.to("sdns-dead-letters")
    assert dict(dead.headers or [])["sdns-error"].startswith(b"scoring failed: RuntimeError")
    assert [json.loads(s.value)["source"]["offset"] for s in producer.to("scores")] == [0, 2]
    assert b.dead_letters == {"ScoringError": 1}


def test_a_send_that_raises_fails_the_batch_as_an_output_error() -> None:
    scorer, _ = _scorer()
    producer = Producer()
    producer.raise_on_send = KafkaTimeoutError("no metadata for topic scores")
    b = batch([Message("frames", 0, 0, png(DARK))])
    scorer.score_batch(b, producer)
    assert isinstance(b.error, OutputError) and "KafkaTimeoutError" in str(b.error)


def test_abandon_rolls_the_incident_back_so_the_retry_alerts_again() -> None:
    scorer, _ = _scorer()
    producer = Producer()
    messages = [Message("frames", 0, 0, png(BRIGHT))]
    failed = batch(messages)
    scorer.score_batch(failed, producer)
    assert len(failed.alerts) == 1 and scorer.alerting.open_count == 1
    scorer.abandon(failed)  # its alert was never acknowledged
    assert scorer.alerting.open_count == 0
    retried = batch(messages, generation=scorer.generation)
    scorer.score_batch(retried, producer)
    assert len(retried.alerts) == 1  # a new incident's first alert, not a silent extension


def test_batches_queued_before_an_abandon_are_skipped_not_scored() -> None:
    scorer, _ = _scorer()
    producer = Producer()
    stale = batch([Message("frames", 0, 0, png(DARK))], generation=0)
    scorer.abandon(stale)
    current = batch([Message("frames", 0, 0, png(DARK))], generation=scorer.generation)
    scorer.start(lambda: producer)
    scorer.submit(stale)
    scorer.submit(current)
    scorer.close()
    assert stale.scored.is_set() and isinstance(stale.error, OutputError)
    assert "abandoned" in str(stale.error)
    assert current.delivered() is True
    assert len(producer.to("scores")) == 1  # only the current batch sent anything


def test_process_delivers_and_counts_or_raises_and_changes_nothing() -> None:
    scorer, delivered = _scorer()
    ok = batch([Message("frames", 0, 0, png(BRIGHT))])
    scorer.process(ok, Producer())
    assert delivered == [ok]
    refused = batch([Message("frames", 0, 1, png(BRIGHT))])
    other, _ = _scorer()
    with pytest.raises(OutputError, match="records were not delivered"):
        other.process(refused, Producer(refuse={"sdns-alerts"}))
    assert other.alerting.open_count == 0  # rolled back: the retry opens it again


def test_an_idle_scorer_closes_quiet_incidents() -> None:
    scorer, delivered = _scorer(incident_window_s=0.05)
    producer = Producer()
    scorer.process(batch([Message("frames", 0, 0, png(BRIGHT))]), producer)
    scorer.start(lambda: producer)
    closed = threading.Event()
    for _ in range(40):
        if producer.to("sdns-alerts")[1:]:
            closed.set()
            break
        threading.Event().wait(0.05)
    scorer.close()
    assert closed.is_set()
    closing = json.loads(producer.to("sdns-alerts")[1].value)
    assert closing["incident_id"].startswith(incident_id("cam-1", 0).split("@")[0] + "@")
    assert closing["key"] == "cam-1" and closing["frames"] == 1
    assert sum(b.incidents_closed for b in delivered) == 1


class _AbandonDuringFlush(Producer):
    """A producer whose records fail, and whose flush() lets the loop abandon the batches in
    flight meanwhile (as `_retry_later` does on its thread while the scorer waits for acks)."""

    def __init__(self, scorer: Scorer, failed: Batch) -> None:
        super().__init__(refuse={"sdns-alerts"})
        self.scorer, self.failed = scorer, failed

    def flush(self, timeout: float | None = None) -> None:
        self.scorer.abandon(self.failed)


def test_an_idle_closing_that_fails_after_an_abandon_keeps_the_abandons_state() -> None:
    scorer, _ = _scorer(incident_window_s=0.01)
    first = batch([Message("frames", 0, 0, png(BRIGHT))])
    scorer.score_batch(first, Producer())  # opens cam-1's incident; the batch then fails
    threading.Event().wait(0.02)  # quiet for the window: the next batch closes the incident
    closing = Batch.decoded_already([], None, scorer.generation, Decoded())
    with pytest.raises(OutputError):
        scorer.process(closing, _AbandonDuringFlush(scorer, first))
    # The abandon rolled back to before `first`: no incident, so its retry alerts again. The
    # closing's own snapshot (cam-1 open) must not be restored over it.
    assert scorer.alerting.open_count == 0


class _Faulty(Detector):
    """A model whose device fails until `healed` (as a GPU fault does): every frame fails."""

    def __init__(self) -> None:
        super().__init__()
        self.healed = False

    def anomaly_scores(self, prepared: np.ndarray) -> np.ndarray:
        if not self.healed:
            raise RuntimeError("CUDA error: an illegal memory access was encountered")
        return super().anomaly_scores(prepared)


def test_a_model_failing_on_every_frame_trips_the_breaker_instead_of_dead_lettering() -> None:
    scorer, _ = _scorer()
    producer, model = Producer(), _Faulty()
    b = batch([Message("frames", 0, i, png(DARK)) for i in range(4)], detector=model)
    scorer.score_batch(b, producer)
    assert isinstance(b.error, ScoringUnavailable) and isinstance(b.error, OutputError)
    assert "scoring failed for the last 4 frames (RuntimeError: CUDA error" in str(b.error)
    assert producer.to("sdns-dead-letters") == []  # nothing lost to the dead letters
    model.healed = True
    retried = batch([Message("frames", 0, i, png(DARK)) for i in range(4)], detector=model)
    scorer.score_batch(retried, producer)
    assert retried.error is None and len(producer.to("scores")) == 4


def test_frames_that_fail_beside_frames_that_score_are_dead_letters_not_a_fault() -> None:
    scorer, _ = _scorer()
    producer = Producer()
    poisoned = Detector(fail_on=BRIGHT / 255)
    frames = [png(BRIGHT), png(BRIGHT), png(DARK)]  # two poisoned frames, one good
    b = batch([Message("frames", 0, i, f) for i, f in enumerate(frames)], detector=poisoned)
    scorer.score_batch(b, producer)
    assert b.error is None and b.dead_letters == {"ScoringError": 2}
    alone = batch([Message("frames", 0, 3, png(BRIGHT))], detector=poisoned)
    scorer.score_batch(alone, producer)  # one failure after a success: still the frame's
    assert alone.error is None and alone.dead_letters == {"ScoringError": 1}


def test_with_camera_alarms_a_camera_alerts_once_when_its_frames_change() -> None:
    scorer = Scorer(settings(), lambda batch: None)  # alerts = cameras, the default
    producer = Producer()
    healthy = batch([Message("frames", 0, i, png(DARK), key=b"cam-1") for i in range(20)])
    scorer.score_batch(healthy, producer)
    assert producer.to("sdns-alerts") == []
    broken = batch([Message("frames", 0, 20 + i, png(255), key=b"cam-1") for i in range(40)])
    scorer.score_batch(broken, producer)
    (alert,) = producer.to("sdns-alerts")  # one alert for the camera, not one per frame
    body = json.loads(alert.value)
    assert body["kind"] == "camera-alarm" and alert.key == b"cam-1"
    assert body["alarm"]["first_frame"]["offset"] == 20 and body["alarm"]["alerts"] == 1
    assert 20 < body["source"]["offset"] < 40 and scorer.alerting.open_count == 1
    assert broken.flagged["frames"] == 40  # every flagged frame still counted


def _alarm_offset(detector: Detector, **overrides: object) -> int:
    """The offset of the frame that opens a camera's alarm, frames flagged from offset 0."""
    scorer = Scorer(settings(**overrides), lambda batch: None)
    producer = Producer()
    frames = [Message("frames", 0, i, png(255), key=b"cam-1") for i in range(200)]
    scorer.score_batch(batch(frames, detector=detector), producer)
    (alert,) = producer.to("sdns-alerts")
    return int(json.loads(alert.value)["source"]["offset"])


def test_the_camera_margin_comes_from_the_bundles_held_out_check_unless_configured() -> None:
    default = _alarm_offset(Detector())  # no check in the bundle: margin 1.5
    assert _alarm_offset(Detector(held_out_ratio=1.2)) == default  # below 1.5: 1.5 still
    wider = _alarm_offset(Detector(held_out_ratio=4.0))
    assert wider > default  # a wider margin needs more evidence
    assert _alarm_offset(Detector(held_out_ratio=4.0), camera_margin=1.5) == default


def test_camera_state_is_written_once_per_camera_by_the_batch_that_writes_it() -> None:
    scorer = Scorer(settings(state_topic="state"), lambda batch: None)
    producer = Producer()
    for start in (0, 10):
        quiet = batch([Message("frames", 0, start + i, png(DARK), key=b"cam-1") for i in range(10)])
        quiet.writes_state = False
        scorer.score_batch(quiet, producer)
    assert producer.to("state") == []
    writer = batch([Message("frames", 0, 20, png(DARK), key=b"cam-2")])
    scorer.score_batch(writer, producer)  # writes_state, the default
    written = {m.key: json.loads(m.value) for m in producer.to("state")}
    assert set(written) == {b"frames/cam-1", b"frames/cam-2"}  # one record each, the latest
    assert written[b"frames/cam-1"]["offset"] == 19
