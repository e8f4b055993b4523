"""The low-level score and the combined score beside SDNS."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from scipy import ndimage

from sdns_monitor.bundle import LowLevelSpec, load_bundle, write_bundle
from sdns_monitor.detector import Detector
from sdns_monitor.errors import BundleError, ConfigError
from sdns_monitor.lowlevel import (
    MAX_DIM,
    combine,
    image_statistics,
    lowlevel_features,
    pooled_side,
    statistics_names,
    statistics_score,
)
from sdns_monitor.scoring import combined_score


def test_pooled_features_are_compact_unit_vectors_and_flat_frames_are_zero() -> None:
    assert pooled_side(28, 1) == 16 and pooled_side(32, 3) == 9 and pooled_side(8, 1) == 8
    assert pooled_side(28, 1) ** 2 <= MAX_DIM and pooled_side(32, 3) ** 2 * 3 <= MAX_DIM
    rng = np.random.default_rng(0)
    frames = rng.integers(0, 256, (4, 28, 28, 1), dtype=np.uint8)
    frames[2] = 128
    frames[3] = 0
    f = lowlevel_features(frames, 16)
    assert f.shape == (4, 256)
    norms = f.norm(dim=1).numpy()
    assert np.allclose(norms[:2], 1, atol=1e-5) and norms[2] == norms[3] == 0
    # Brightness is not a shift: a dimmer copy of a frame has the same features.
    dim = (frames[:1] // 2).astype(np.uint8)
    assert np.allclose(
        lowlevel_features(dim, 16), lowlevel_features(frames[:1] // 2 * 2, 16), atol=0.02
    )


def test_combined_score_standardises_each_part() -> None:
    out = combined_score([(np.array([1.0, 3.0]), 1.0, 2.0), (np.array([10.0, 30.0]), 10.0, 20.0)])
    assert out.tolist() == [0.0, 2.0]
    three = combined_score([(np.array([1.0]), 0.0, 1.0)] * 3)
    assert three.tolist() == [3.0]


def _scene(n: int, seed: int = 0) -> np.ndarray:
    """Colour frames: smooth gradients plus waves of a 16 px period, mid exposure."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:32, 0:32] / 32.0
    base = np.stack([0.3 + 0.4 * xx, 0.3 + 0.4 * yy, 0.5 - 0.2 * xx], axis=-1)
    phase = rng.uniform(0, 6, (n, 1, 1))
    waves = np.sin(xx * 4 * np.pi + phase) * np.cos(yy * 4 * np.pi)
    fine = np.sin(xx * 16 * np.pi + 2 * phase) * np.sin(yy * 16 * np.pi)  # a 4 px period
    detail = (0.12 * waves + 0.04 * fine)[..., None]
    return ((base[None] + detail).clip(0, 1) * 255).astype(np.uint8)


def test_image_statistics_see_exposure_blur_noise_and_clipping() -> None:
    names = statistics_names(3)
    frames = _scene(8)
    base = image_statistics(frames)
    assert base.shape == (8, len(names)) and len(statistics_names(1)) == len(names) - 5
    col = {name: i for i, name in enumerate(names)}
    darker = image_statistics((frames // 3).astype(np.uint8))
    assert (darker[:, col["mean_0"]] < base[:, col["mean_0"]] - 0.1).all()
    blurred = ndimage.uniform_filter(frames.astype(np.float32), size=(1, 3, 3, 1), mode="nearest")
    blurred_stats = image_statistics(blurred.astype(np.uint8))
    assert (blurred_stats[:, col["laplacian"]] < base[:, col["laplacian"]]).all()
    noisy = (frames + np.random.default_rng(1).normal(0, 25, frames.shape)).clip(0, 255)
    noisy_stats = image_statistics(noisy.astype(np.uint8))
    assert (noisy_stats[:, col["laplacian_median"]] > base[:, col["laplacian_median"]]).all()
    white = image_statistics(np.full((2, 32, 32, 3), 255, np.uint8))
    assert white[:, col["clipped_high"]].tolist() == [1.0, 1.0]
    assert np.isfinite(image_statistics(np.zeros((1, 32, 32, 1), np.uint8)).numpy()).all()


def test_statistics_score_is_the_mean_distance_to_the_nearest_reference_frames() -> None:
    reference = torch.tensor([[0.0, 0.0], [1.0, 0.0], [10.0, 0.0]])
    mean, std = torch.zeros(2), torch.tensor([1.0, 2.0])
    scores = statistics_score(torch.tensor([[0.0, 0.0], [0.0, 4.0]]), reference, mean, std, 2)
    # Standardised: the query (0, 4) sits at (0, 2); its two nearest are (0, 0) and (1, 0).
    np.testing.assert_allclose(scores, [0.5, (2.0 + np.sqrt(5.0)) / 2])


def _with_lowlevel(tiny_bundle: Path, out: Path, fashion: np.ndarray, default: str) -> Path:
    """The tiny bundle plus a low-level bank of the same reference images."""
    b = load_bundle(tiny_bundle)
    det = Detector(b, device="cpu")
    bank = lowlevel_features(fashion[:300], pooled_side(16, 1)).numpy()
    val = fashion[600:800]
    sdns_val = det.sdns_scores(val)
    from sdns_monitor.index import ReferenceIndex

    low_val = ReferenceIndex(bank).kernel_scores(lowlevel_features(val, 16), 200, 0.04)
    spec = LowLevelSpec(
        side=16,
        k=200,
        n_reference=300,
        sdns_mean=float(sdns_val.mean()),
        sdns_std=float(sdns_val.std()),
        low_mean=float(low_val.mean()),
        low_std=float(low_val.std()),
    )
    score = b.manifest.score.model_copy(update={"lowlevel": spec, "default": default})
    manifest = b.manifest.model_copy(update={"score": score, "files": {}})
    cal = fashion[300:600]
    cal_low = ReferenceIndex(bank).kernel_scores(lowlevel_features(cal, 16), 200, 0.04)
    cal_combined = combine(spec, det.sdns_scores(cal), {"pixels": cal_low})
    return write_bundle(out, manifest, b.state_dict, b.features, b.calibration, bank, cal_combined)


def test_score_modes_of_a_bundle_with_the_combined_score(
    tiny_bundle: Path, fashion_test: np.ndarray, tmp_path: Path
) -> None:
    path = _with_lowlevel(tiny_bundle, tmp_path / "c.sdns", fashion_test, default="combined")
    auto = Detector.load(path, device="cpu")
    sdns = Detector.load(path, device="cpu", score="sdns")
    assert (auto.score_mode, sdns.score_mode) == ("combined", "sdns")
    id_frames = fashion_test[2000:2200]
    black = np.zeros((20, 16, 16, 1), np.uint8)
    # The faithful score is unchanged by the extra bank.
    plain = Detector.load(tiny_bundle, device="cpu")
    assert np.allclose(sdns.anomaly_scores(id_frames), plain.anomaly_scores(id_frames))
    # Combined p-values are calibrated: about the alarm rate of ID frames are flagged ...
    rate = auto.score(id_frames, alarm_rate=0.1).flags.mean()
    assert 0.02 < rate < 0.22, rate
    # ... and a black frame is far from everything at the pixel level.
    assert auto.score(black, alarm_rate=0.01).flags.all()


def test_combined_needs_a_bundle_that_has_it(tiny_bundle: Path) -> None:
    assert Detector.load(tiny_bundle, device="cpu").score_mode == "sdns"
    with pytest.raises(ConfigError, match="has no combined score"):
        Detector.load(tiny_bundle, device="cpu", score="combined")


def test_a_missing_lowlevel_file_is_refused(
    tiny_bundle: Path, fashion_test: np.ndarray, tmp_path: Path
) -> None:
    path = _with_lowlevel(tiny_bundle, tmp_path / "c.sdns", fashion_test, default="sdns")
    broken = tmp_path / "broken.sdns"
    shutil.copytree(path, broken)
    (broken / "lowlevel.npy").unlink()
    with pytest.raises(BundleError, match=r"lowlevel\.npy is missing"):
        load_bundle(broken)
