"""Recalibration: new calibration scores for an existing encoder and reference bank.

A camera whose normal scenes drift slowly (season, lighting) needs new p-values, not a new
encoder. The result is a new bundle; the old one is left untouched.
"""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path

from sdns_monitor.bundle import calibration_summary, cross_check, load_bundle, write_bundle
from sdns_monitor.data import load_dataset
from sdns_monitor.detector import Detector, check_rule
from sdns_monitor.errors import DataError


def recalibrate(
    model: str | Path,
    data: str,
    out: str | Path,
    *,
    alarm_rate: float | None = None,
    device: str = "auto",
) -> Path:
    """Score `data` (in-distribution images never used for training) and write bundle `out`."""
    check_rule(alarm_rate, None)
    bundle = load_bundle(model)
    det = Detector(bundle, device=device)
    images = load_dataset(data, size=bundle.manifest.input.size).images
    if len(images) < 10:
        raise DataError(
            f"{data}: {len(images)} images are too few to calibrate; give at least 10 (100+ recommended)"
        )
    prepared = det.prepare(images)
    scores = det.sdns_scores(prepared)
    combined = None
    if bundle.manifest.score.lowlevel is not None:  # both calibrations, as `fit` writes them
        combined = Detector(bundle, device=det.device, score="combined").anomaly_scores(prepared)
    m = bundle.manifest
    rate = m.calibration.default_alarm_rate if alarm_rate is None else alarm_rate
    held_out = {"sdns": cross_check(scores, data)}
    if combined is not None:
        held_out["combined"] = cross_check(combined, data)
    manifest = m.model_copy(
        update={
            "name": Path(out).name.removesuffix(".sdns"),
            "calibration": calibration_summary(scores, rate, data, held_out),
            "files": {},
            "created_at": datetime.now(UTC).isoformat(timespec="seconds"),
        }
    )
    return write_bundle(
        Path(out), manifest, bundle.state_dict, bundle.features, scores, bundle.lowlevel, combined
    )
