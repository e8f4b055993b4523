"""The model bundle: round trip, hashes, tamper detection, refusal of pickles, immutability."""

from __future__ import annotations

import hashlib
import json
import os
import pickle
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from sdns_monitor.bundle import (
    CALIBRATION,
    ENCODER,
    FEATURES,
    FORMAT_VERSION,
    MANIFEST,
    REQUIRED_FILES,
    CalibrationSummary,
    InputSpec,
    Manifest,
    ScoreSpec,
    cross_check,
    held_out_check,
    load_bundle,
    sha256_file,
    write_bundle,
)
from sdns_monitor.errors import BundleError
from sdns_monitor.networks import BackboneConfig

D = 8


def _manifest(name: str = "unit") -> Manifest:
    return Manifest(
        name=name,
        created_at="2026-01-01T00:00:00+00:00",  # fixed, so equal content gives equal bytes
        backbone=BackboneConfig(name="cnn-small", image_size=16, width=4),
        input=InputSpec(size=16, model_size=16, channels=1, mean=[0.3], std=[0.2]),
        feature_dim=D,
        score=ScoreSpec(temperature=0.04, k=5, n_reference=20),
        calibration=CalibrationSummary(n=30, quantiles={"0.5": 1.0}, default_alarm_rate=0.05),
    )


def _content(seed: int = 0) -> tuple[dict[str, torch.Tensor], np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    state = {
        "body.0.weight": torch.from_numpy(rng.normal(size=(4, 1, 3, 3)).astype(np.float32)),
        "body.1.running_mean": torch.zeros(4),
        "body.1.num_batches_tracked": torch.tensor(3),
    }
    features = rng.normal(size=(20, D)).astype(np.float32)
    features /= np.linalg.norm(features, axis=1, keepdims=True)
    calibration = rng.normal(size=30)  # unsorted on purpose
    return state, features, calibration


def _write(path: Path, seed: int = 0, manifest: Manifest | None = None) -> Path:
    state, features, calibration = _content(seed)
    return write_bundle(path, manifest or _manifest(), state, features, calibration)


def _rewrite_manifest(path: Path, **changes: object) -> None:
    data = json.loads((path / MANIFEST).read_text())
    data.update(changes)
    (path / MANIFEST).write_text(json.dumps(data))


def _rehash(path: Path, name: str) -> None:
    data = json.loads((path / MANIFEST).read_text())
    data["files"][name] = sha256_file(path / name)
    (path / MANIFEST).write_text(json.dumps(data))


# --- round trip ------------------------------------------------------------------------


def test_round_trip(tmp_path: Path) -> None:
    state, features, calibration = _content()
    manifest = _manifest()
    path = write_bundle(tmp_path / "m.sdns", manifest, state, features, calibration)
    assert path == tmp_path / "m.sdns"
    assert sorted(p.name for p in path.iterdir()) == sorted([MANIFEST, *REQUIRED_FILES])

    b = load_bundle(path)
    assert b.path == path
    assert b.name == "unit"
    assert b.manifest.model_dump(exclude={"files"}) == manifest.model_dump(exclude={"files"})
    assert b.manifest.files == {n: sha256_file(path / n) for n in REQUIRED_FILES}
    assert b.features.dtype == np.float32
    np.testing.assert_array_equal(b.features, features)
    assert b.calibration.dtype == np.float64
    np.testing.assert_array_equal(b.calibration, np.sort(calibration))
    assert b.state_dict.keys() == state.keys()
    for key, value in state.items():
        assert b.state_dict[key].dtype == value.dtype
        assert torch.equal(b.state_dict[key], value)


def test_bundle_hash_is_sha256_of_manifest_bytes(tmp_path: Path) -> None:
    path = _write(tmp_path / "m.sdns")
    digest = hashlib.sha256((path / MANIFEST).read_bytes()).hexdigest()
    assert load_bundle(path).hash == digest


def test_bundle_hash_is_content_addressed(tmp_path: Path) -> None:
    same_a = load_bundle(_write(tmp_path / "a.sdns", seed=0)).hash
    same_b = load_bundle(_write(tmp_path / "b.sdns", seed=0)).hash
    other = load_bundle(_write(tmp_path / "c.sdns", seed=1)).hash
    assert same_a == same_b
    assert other != same_a


@pytest.mark.parametrize("name", REQUIRED_FILES)
def test_hash_changes_when_any_file_changes(tmp_path: Path, name: str) -> None:
    path = _write(tmp_path / "m.sdns")
    before = load_bundle(path).hash
    if name == CALIBRATION:
        np.save(path / name, np.arange(5, dtype=np.float64))
    elif name == FEATURES:
        np.save(path / name, np.eye(D, dtype=np.float32))
    else:
        from safetensors.torch import save_file

        save_file({"w": torch.ones(2)}, str(path / name))
    _rehash(path, name)  # a consistent new bundle, but not the same one
    assert load_bundle(path).hash != before


def test_manifest_edit_changes_identity(tmp_path: Path) -> None:
    # The manifest cannot hold its own hash; an edit shows as a different bundle identity.
    path = _write(tmp_path / "m.sdns")
    before = load_bundle(path).hash
    _rewrite_manifest(path, name="renamed")
    after = load_bundle(path)
    assert after.name == "renamed"
    assert after.hash != before


# --- tampering -------------------------------------------------------------------------


@pytest.mark.parametrize("name", REQUIRED_FILES)
def test_changed_byte_in_any_file_is_refused(tiny_bundle: Path, tmp_path: Path, name: str) -> None:
    path = Path(shutil.copytree(tiny_bundle, tmp_path / "t.sdns"))
    data = bytearray((path / name).read_bytes())
    data[len(data) // 2] ^= 0x01
    (path / name).write_bytes(bytes(data))
    with pytest.raises(BundleError, match=f"{name} does not match its SHA-256"):
        load_bundle(path)


@pytest.mark.parametrize("name", REQUIRED_FILES)
def test_missing_file_is_refused(tiny_bundle: Path, tmp_path: Path, name: str) -> None:
    path = Path(shutil.copytree(tiny_bundle, tmp_path / "t.sdns"))
    (path / name).unlink()
    with pytest.raises(BundleError, match=f"{name} is missing"):
        load_bundle(path)


def test_manifest_without_a_hash_for_a_file_is_refused(tmp_path: Path) -> None:
    path = _write(tmp_path / "m.sdns")
    data = json.loads((path / MANIFEST).read_text())
    del data["files"][FEATURES]
    (path / MANIFEST).write_text(json.dumps(data))
    with pytest.raises(BundleError, match=f"no hash for {FEATURES}"):
        load_bundle(path)


def test_manifest_naming_a_file_outside_the_bundle_is_refused(tmp_path: Path) -> None:
    path = _write(tmp_path / "m.sdns")
    outside = tmp_path / "secret.txt"
    outside.write_text("x")
    data = json.loads((path / MANIFEST).read_text())
    data["files"]["../secret.txt"] = sha256_file(outside)
    (path / MANIFEST).write_text(json.dumps(data))
    with pytest.raises(BundleError, match="outside the bundle"):
        load_bundle(path)


def test_missing_manifest_and_missing_bundle_are_refused(tmp_path: Path) -> None:
    with pytest.raises(BundleError, match="no model bundle"):
        load_bundle(tmp_path / "nothing.sdns")
    path = _write(tmp_path / "m.sdns")
    (path / MANIFEST).unlink()
    with pytest.raises(BundleError, match=f"{MANIFEST} is missing"):
        load_bundle(path)


@pytest.mark.parametrize("version", [FORMAT_VERSION + 1, 0, "1", None])
def test_other_format_version_is_refused(tmp_path: Path, version: object) -> None:
    path = _write(tmp_path / "m.sdns")
    _rewrite_manifest(path, format_version=version)
    with pytest.raises(BundleError, match="format version"):
        load_bundle(path)


@pytest.mark.parametrize("text", ["{not json", "", "[1, 2]", "\xff\xfe"])
def test_invalid_manifest_json_is_refused(tmp_path: Path, text: str) -> None:
    path = _write(tmp_path / "m.sdns")
    (path / MANIFEST).write_bytes(text.encode("latin-1"))
    with pytest.raises(BundleError):
        load_bundle(path)


def test_manifest_with_invalid_field_names_the_field(tmp_path: Path) -> None:
    path = _write(tmp_path / "m.sdns")
    _rewrite_manifest(path, feature_dim="eight")
    with pytest.raises(BundleError, match="feature_dim"):
        load_bundle(path)


class _CreatesMarker:
    """Unpickling this object opens (creates) a file: proof that code ran."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[object, tuple[str, str]]:
        return (open, (str(self.marker), "w"))


def test_pickled_encoder_with_matching_hash_is_refused_without_running(
    tiny_bundle: Path, tmp_path: Path
) -> None:
    marker = tmp_path / "pwned"
    payload = pickle.dumps({"body.0.weight": _CreatesMarker(marker)})
    # The payload is live: plain unpickling runs it.
    pickle.loads(payload)
    assert marker.exists()
    marker.unlink()

    path = Path(shutil.copytree(tiny_bundle, tmp_path / "p.sdns"))
    (path / ENCODER).write_bytes(payload)
    _rehash(path, ENCODER)  # hashes alone cannot stop a swapped file: the format must
    with pytest.raises(BundleError, match="not a valid safetensors file"):
        load_bundle(path)
    assert not marker.exists()


def test_torch_save_checkpoint_as_encoder_is_refused(tiny_bundle: Path, tmp_path: Path) -> None:
    path = Path(shutil.copytree(tiny_bundle, tmp_path / "p.sdns"))
    torch.save(load_bundle(tiny_bundle).state_dict, path / ENCODER)
    _rehash(path, ENCODER)
    with pytest.raises(BundleError, match="not a valid safetensors file"):
        load_bundle(path)


def test_object_array_features_are_refused_without_unpickling(tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    path = _write(tmp_path / "m.sdns")
    arr = np.empty(1, dtype=object)
    arr[0] = _CreatesMarker(marker)
    np.save(path / FEATURES, arr, allow_pickle=True)
    _rehash(path, FEATURES)
    with pytest.raises(BundleError, match="cannot read arrays"):
        load_bundle(path)
    assert not marker.exists()


def test_features_of_wrong_shape_are_refused(tmp_path: Path) -> None:
    path = _write(tmp_path / "m.sdns")
    np.save(path / FEATURES, np.zeros((4, D + 1), np.float32))
    _rehash(path, FEATURES)
    with pytest.raises(BundleError, match=FEATURES):
        load_bundle(path)


def test_non_numeric_calibration_is_a_bundle_error(tmp_path: Path) -> None:
    path = _write(tmp_path / "m.sdns")
    np.save(path / CALIBRATION, np.array(["a", "b"]))
    _rehash(path, CALIBRATION)
    with pytest.raises(BundleError):
        load_bundle(path)


# --- writing ---------------------------------------------------------------------------


def test_existing_path_is_refused_and_left_untouched(tmp_path: Path) -> None:
    path = _write(tmp_path / "m.sdns", seed=0)
    before = {p.name: p.read_bytes() for p in path.iterdir()}
    with pytest.raises(BundleError, match="already exists"):
        _write(path, seed=1)
    assert {p.name: p.read_bytes() for p in path.iterdir()} == before


def test_failed_write_leaves_nothing_behind(tmp_path: Path) -> None:
    state, features, calibration = _content()
    with pytest.raises(ValueError, match="feature_dim"):
        write_bundle(tmp_path / "m.sdns", _manifest(), state, features[:, :3], calibration)
    assert list(tmp_path.iterdir()) == []


def test_written_manifest_hashes_every_file(tmp_path: Path) -> None:
    path = _write(tmp_path / "m.sdns")
    data = json.loads((path / MANIFEST).read_text())
    assert data["format_version"] == FORMAT_VERSION
    assert data["files"] == {n: sha256_file(path / n) for n in REQUIRED_FILES}
    # Weights only: the encoder file is safetensors (8-byte header length, then JSON).
    raw = (path / ENCODER).read_bytes()
    header_len = int.from_bytes(raw[:8], "little")
    assert json.loads(raw[8 : 8 + header_len])


def test_bundle_directory_permissions_follow_the_umask(tmp_path: Path) -> None:
    old = os.umask(0o022)
    try:
        path = _write(tmp_path / "m.sdns")
    finally:
        os.umask(old)
    assert (path / FEATURES).stat().st_mode & 0o777 == 0o644
    assert path.stat().st_mode & 0o777 == 0o755


def test_held_out_images_of_the_calibrations_distribution_are_flagged_at_the_alarm_rate() -> None:
    rng = np.random.default_rng(0)
    check = held_out_check(rng.normal(size=20_000), rng.normal(size=5_000), "validation split")
    assert check.n == 20_000 and check.ratio is not None
    for rate, flagged in check.flag_rates.items():  # binomial and calibration error: 5 sd
        sd = (float(rate) * (1 - float(rate)) * (1 / 20_000 + 1 / 5_000)) ** 0.5
        assert abs(flagged - float(rate)) < 5 * sd
    shifted = held_out_check(rng.normal(0.5, size=2_000), rng.normal(size=5_000), "shifted")
    assert shifted.ratio is not None and shifted.ratio > 2.0  # images unlike the calibration's
    few = held_out_check(rng.normal(size=50), rng.normal(size=5_000), "tiny")
    assert few.ratio is None  # 50 images cannot show a flag rate at 0.2 against 20 expected


def test_a_recalibration_check_crosses_halves_of_its_one_set() -> None:
    check = cross_check(np.random.default_rng(1).normal(size=4_000), "camera frames")
    assert check.n == 4_000 and check.data == "camera frames (halves crossed)"
    assert check.ratio is not None and 0.7 < check.ratio < 1.5
