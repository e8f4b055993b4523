"""fit's helpers: the reference split, k selection and the synthetic validation set."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from sdns_monitor.bundle import load_bundle
from sdns_monitor.data import ImageSet
from sdns_monitor.detector import Detector
from sdns_monitor.errors import DataError
from trainer.config import make_config
from trainer.fit import fit, split_reference


def _set(n: int) -> ImageSet:
    images = np.zeros((n, 8, 8, 1), np.uint8)
    images[:, 0, 0, 0] = np.arange(n) % 256
    images[:, 0, 1, 0] = np.arange(n) // 256
    return ImageSet(images, np.arange(n) % 10, None, "test")


def _ids(s: ImageSet) -> set[int]:
    return set((s.images[:, 0, 0, 0].astype(int) + 256 * s.images[:, 0, 1, 0].astype(int)).tolist())


def test_split_is_disjoint_seeded_and_sized() -> None:
    cfg = make_config("quick", batch_size=8)
    splits = split_reference(_set(1000), cfg)
    train, val, cal = _ids(splits.train), _ids(splits.validation), _ids(splits.calibration)
    assert len(cal) == 100  # calibration_fraction 0.1
    assert len(val) == round(0.05 * 900)
    assert train | val | cal == set(range(1000))
    assert not (train & val) and not (train & cal) and not (val & cal)
    again = split_reference(_set(1000), cfg)
    assert _ids(again.calibration) == cal
    other = split_reference(_set(1000), make_config("quick", batch_size=8, seed=1))
    assert _ids(other.calibration) != cal


def test_split_caps_calibration_and_refuses_tiny_data() -> None:
    cfg = make_config("quick", batch_size=8, max_calibration=50)
    assert len(split_reference(_set(1000), cfg).calibration) == 50
    with pytest.raises(DataError, match="fewer than one training batch"):
        split_reference(_set(10), make_config("quick", batch_size=64))


def test_fit_on_non_square_colour_images_writes_a_loadable_bundle(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    np.savez(tmp_path / "r.npz", images=rng.integers(0, 256, (600, 20, 30, 3), dtype=np.uint8))
    cfg = make_config("quick", steps_per_epoch=2, batch_size=32, aux=[], neg_source="id", width=4)
    report = fit(f"npz:{tmp_path / 'r.npz'}", tmp_path / "m.sdns", cfg, log=lambda _m: None)
    assert report is not None and report.bundle == tmp_path / "m.sdns"
    manifest = load_bundle(report.bundle).manifest
    spec = manifest.input
    assert (spec.size, spec.model_size, spec.channels) == (30, 30, 3)  # the longer side
    low = manifest.score.lowlevel  # the combined score, standardised on validation images
    assert low is not None and low.side == 9 and low.n_reference == manifest.training.n_train
    v = low.validation
    better = "combined" if v["auroc_combined"] > v["auroc_sdns"] else "sdns"
    assert manifest.score.default == v["default"] == report.score_default == better
    assert manifest.score.index_quality == {}  # exact search: nothing to measure
    held_out = manifest.calibration.held_out  # validation images against each calibration
    assert set(held_out) == {"sdns", "combined"}
    assert held_out["sdns"].n == manifest.training.n_validation > 0
    scores = Detector.load(report.bundle, device="cpu").score(
        rng.integers(0, 256, (5, 20, 30, 3), dtype=np.uint8)
    )
    assert len(scores) == 5 and np.isfinite(scores.scores).all()


def test_fit_with_an_approximate_index_records_its_quality(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    np.savez(tmp_path / "r.npz", images=rng.integers(0, 256, (600, 12, 12, 1), dtype=np.uint8))
    cfg = make_config(
        "quick",
        steps_per_epoch=2,
        batch_size=32,
        aux=[],
        neg_source="id",
        width=4,
        index_factory="IVF8,Flat",
        score_k=20,
    )
    report = fit(f"npz:{tmp_path / 'r.npz'}", tmp_path / "m.sdns", cfg, log=lambda _m: None)
    assert report is not None
    quality = load_bundle(report.bundle).manifest.score.index_quality
    assert set(quality) == {"recall_at_20", "auroc_exact", "auroc_approximate", "auroc_change"}
    assert 0.0 <= quality["recall_at_20"] <= 1.0
