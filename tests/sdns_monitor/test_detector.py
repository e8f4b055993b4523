"""Detector: input layouts, flagging rules, calibration, and refusal of tampered bundles."""

from __future__ import annotations

import io
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import sdns_monitor.detector as detector_module
from sdns_monitor import Detector
from sdns_monitor.bundle import FEATURES, load_bundle, write_bundle
from sdns_monitor.errors import BundleError, ConfigError, FrameError
from sdns_monitor.scoring import p_values

ATOL = 1e-5


@pytest.fixture(scope="module")
def frames(fashion_test: np.ndarray) -> np.ndarray:
    """4 uint8 16 x 16 x 1 images that are neither reference nor calibration images."""
    return fashion_test[1000:1004].copy()


def _png(image: Image.Image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


def _scores_one_by_one(det: Detector, items: list[object]) -> np.ndarray:
    return np.concatenate([det.score(item).scores for item in items])  # type: ignore[arg-type]


# --- inputs ----------------------------------------------------------------------------


# Decoded PIL images are read-only arrays; torch warns when it wraps them (nothing writes).
@pytest.mark.filterwarnings("ignore:The given NumPy array is not writable")
def test_same_images_in_every_layout_give_the_same_scores(
    det: Detector, frames: np.ndarray
) -> None:
    expected = det.score(frames).scores
    assert expected.shape == (4,) and expected.dtype == np.float64
    gray = frames[..., 0]
    rgb = np.repeat(frames, 3, axis=-1)  # gray -> RGB -> gray (BT.601 weights sum to 1)
    rgba = np.concatenate([rgb, np.full_like(frames, 255)], axis=-1)
    layouts: dict[str, list[object]] = {
        "H x W": list(gray),
        "H x W x 1": list(frames),
        "H x W x 3": list(rgb),
        "H x W x 4": list(rgba),
        "float [0, 1] H x W x 1": [f.astype(np.float32) / 255.0 for f in frames],
        "PIL L": [Image.fromarray(g, mode="L") for g in gray],
        "PIL RGB": [Image.fromarray(c, mode="RGB") for c in rgb],
        "PNG bytes": [_png(Image.fromarray(g, mode="L")) for g in gray],
        "RGB PNG bytes": [_png(Image.fromarray(c, mode="RGB")) for c in rgb],
        ".npy bytes": [_npy(f) for f in frames],
    }
    for name, items in layouts.items():
        np.testing.assert_allclose(
            _scores_one_by_one(det, items), expected, atol=ATOL, err_msg=name
        )
    batches = {
        "N x H x W x 3": rgb,
        "float tensor N x 1 x H x W": torch.from_numpy(frames).permute(0, 3, 1, 2).float() / 255,
        "float tensor N x 3 x H x W": torch.from_numpy(rgb).permute(0, 3, 1, 2).double() / 255,
        "mixed list": [gray[0], Image.fromarray(gray[1]), _png(Image.fromarray(gray[2])), rgb[3]],
    }
    for name, batch in batches.items():
        np.testing.assert_allclose(det.score(batch).scores, expected, atol=ATOL, err_msg=name)  # type: ignore[arg-type]


def _npy(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, array)
    return buf.getvalue()


def test_larger_frames_are_resized_to_the_model_input(det: Detector) -> None:
    prepared = det.prepare(np.zeros((40, 52, 3), np.uint8))
    assert prepared.shape == (1, 16, 16, 1) and prepared.dtype == np.uint8


@pytest.mark.parametrize(
    "bad",
    [
        np.zeros((3, 16, 16), np.uint8),  # channels-first: never guessed
        np.zeros((2, 3, 16, 16), np.uint8),
        np.zeros((16,), np.uint8),
        np.zeros((1, 2, 16, 16, 1), np.uint8),
        np.zeros((16, 16, 2), np.uint8),
        torch.zeros(2, 1, 16, 16, dtype=torch.uint8),  # integer tensors: pass numpy
        torch.zeros(1, 16, 16),  # tensors must be N x C x H x W
        b"not an image",
        "picture.png",
    ],
    ids=[
        "CHW",
        "NCHW-numpy",
        "1-D",
        "5-D",
        "2-channel",
        "uint8-tensor",
        "3-D-tensor",
        "bytes",
        "str",
    ],
)
def test_ambiguous_or_unknown_inputs_raise_frame_error(det: Detector, bad: object) -> None:
    with pytest.raises(FrameError):
        det.score(bad)  # type: ignore[arg-type]


def test_bfloat16_tensor_is_scored_like_float32(det: Detector, frames: np.ndarray) -> None:
    x = torch.from_numpy(frames).permute(0, 3, 1, 2).float() / 255
    expected = det.score(x).scores
    np.testing.assert_allclose(det.score(x.bfloat16()).scores, expected, atol=1e-3)


def test_empty_list_gives_empty_result(det: Detector) -> None:
    result = det.score([])
    assert len(result) == 0
    assert result.flags.shape == (0,)


# --- rules -----------------------------------------------------------------------------


def test_alarm_rate_and_threshold_are_mutually_exclusive(det: Detector, frames: np.ndarray) -> None:
    with pytest.raises(ConfigError, match="mutually exclusive"):
        det.score(frames, alarm_rate=0.1, threshold=1.0)


@pytest.mark.parametrize("rate", [0.0, 1.0, -0.1, 1.5])
def test_alarm_rate_outside_unit_interval_is_refused(
    det: Detector, frames: np.ndarray, rate: float
) -> None:
    with pytest.raises(ConfigError, match="alarm-rate"):
        det.score(frames, alarm_rate=rate)


def test_flags_follow_p_value_and_threshold_rules(det: Detector, fashion_test: np.ndarray) -> None:
    images = fashion_test[1000:1100]
    default = det.score(images)
    assert default.alarm_rate == pytest.approx(0.1)  # the bundle's default
    assert default.threshold is None
    np.testing.assert_array_equal(default.flags, default.p_values < 0.1)
    np.testing.assert_allclose(default.p_values, p_values(default.scores, det.calibration))
    assert np.all((default.p_values > 0) & (default.p_values <= 1))

    half = det.score(images, alarm_rate=0.5)
    np.testing.assert_array_equal(half.scores, default.scores)
    np.testing.assert_array_equal(half.flags, half.p_values < 0.5)
    assert 0 < half.flags.sum() < len(images)
    assert half.flags.sum() >= default.flags.sum()

    t = float(np.median(default.scores))
    by_score = det.score(images, threshold=t)
    assert by_score.threshold == t and by_score.alarm_rate is None
    np.testing.assert_array_equal(by_score.flags, default.scores > t)
    assert by_score.flags.sum() == 50


def test_calibration_images_reproduce_the_bundle_calibration(
    det: Detector, fashion_test: np.ndarray
) -> None:
    # The bundle's calibration scores were computed from images 300-599 at build time.
    scores = det.anomaly_scores(det.prepare(fashion_test[300:600]))
    np.testing.assert_allclose(np.sort(scores), det.calibration, rtol=1e-6, atol=1e-9)


def test_reference_images_are_less_anomalous_than_noise(
    det: Detector, fashion_test: np.ndarray
) -> None:
    reference = det.score(fashion_test[:50]).scores
    noise = np.random.default_rng(0).integers(0, 256, (50, 16, 16, 1), dtype=np.uint8)
    assert np.median(det.score(noise).scores) > np.median(reference)


def test_false_alarm_rate_on_held_out_id_images_matches_alarm_rate(
    tiny_bundle: Path, tmp_path: Path, det: Detector, fashion_test: np.ndarray
) -> None:
    """Conformal guarantee: with exchangeable ID frames, P(p < alpha) is about alpha."""
    images = fashion_test[600:3000]  # neither reference nor the fixture's calibration
    order = np.random.default_rng(0).permutation(len(images))
    cal_images, test_images = images[order[:1200]], images[order[1200:]]
    cal_scores = det.anomaly_scores(det.prepare(cal_images))
    b = load_bundle(tiny_bundle)
    path = write_bundle(
        tmp_path / "recal.sdns",
        b.manifest.model_copy(update={"files": {}}),
        b.state_dict,
        b.features,
        cal_scores,
    )
    recal = Detector.load(path, device="cpu")
    for alpha in (0.1, 0.3):
        rate = recal.score(test_images, alarm_rate=alpha).flags.mean()
        # Binomial sd at n = 1200 is <= 0.014, plus the calibration set's own spread.
        assert abs(rate - alpha) < 0.05, (alpha, rate)


# --- loading ---------------------------------------------------------------------------


def test_detector_exposes_bundle_identity(det: Detector, tiny_bundle: Path) -> None:
    assert det.name == "tiny"
    assert det.hash == load_bundle(tiny_bundle).hash
    assert det.k == 50 and det.temperature == pytest.approx(0.04)


def test_tampered_bundle_fails_before_any_weight_is_used(
    tiny_bundle: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = Path(shutil.copytree(tiny_bundle, tmp_path / "t.sdns"))
    data = bytearray((path / FEATURES).read_bytes())
    data[-3] ^= 0xFF
    (path / FEATURES).write_bytes(bytes(data))

    def no_network(*_args: object, **_kwargs: object) -> None:
        raise AssertionError("a network was built from a tampered bundle")

    monkeypatch.setattr(detector_module, "create_backbone", no_network)
    with pytest.raises(BundleError, match=FEATURES):
        Detector.load(path, device="cpu")


def test_weights_that_do_not_fit_the_backbone_are_a_bundle_error(
    tiny_bundle: Path, tmp_path: Path
) -> None:
    b = load_bundle(tiny_bundle)
    wider = b.manifest.backbone.model_copy(update={"width": 8})
    path = write_bundle(
        tmp_path / "w.sdns",
        b.manifest.model_copy(update={"backbone": wider, "files": {}}),
        b.state_dict,
        b.features,
        b.calibration,
    )
    with pytest.raises(BundleError, match="weights do not fit"):
        Detector.load(path, device="cpu")
