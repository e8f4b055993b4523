"""SVHN .mat files: X is 32 x 32 x 3 x N, y is N x 1 with the digit 0 stored as 10."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import scipy.io

from sdns_monitor.data import load_dataset
from sdns_monitor.errors import DataError


def _write_mat(path: Path, n: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    x = rng.integers(0, 256, size=(32, 32, 3, n), dtype=np.uint8)
    y = rng.integers(1, 11, size=(n, 1)).astype(np.uint8)
    y[0, 0] = 10
    scipy.io.savemat(str(path), {"X": x, "y": y})
    return x, y


@pytest.mark.parametrize("split", ["train", "test", "extra"])
def test_svhn_moves_the_image_axis_first_and_maps_10_to_0(tmp_path: Path, split: str) -> None:
    x, y = _write_mat(tmp_path / f"{split}_32x32.mat", 7)
    ds = load_dataset(f"svhn:{tmp_path}:{split}")
    assert ds.images.shape == (7, 32, 32, 3) and ds.images.dtype == np.uint8
    np.testing.assert_array_equal(ds.images[4], x[:, :, :, 4])
    assert ds.labels is not None and ds.labels.dtype == np.int64
    assert ds.labels[0] == 0
    assert ds.labels.tolist() == [0 if v == 10 else int(v) for v in y[:, 0]]


def test_svhn_class_filter_on_the_mapped_labels(tmp_path: Path) -> None:
    _, y = _write_mat(tmp_path / "test_32x32.mat", 30)
    ds = load_dataset(f"svhn:{tmp_path}:test@0")
    assert len(ds) == int((y == 10).sum()) and set(ds.labels.tolist()) == {0}  # type: ignore[union-attr]


def test_missing_and_unreadable_svhn_files(tmp_path: Path) -> None:
    with pytest.raises(DataError, match=r"test_32x32\.mat not found; download"):
        load_dataset(f"svhn:{tmp_path}:test")
    (tmp_path / "train_32x32.mat").write_bytes(b"not a mat file at all")
    with pytest.raises(DataError, match=r"svhn:.*:train: cannot read .* as a MATLAB file"):
        load_dataset(f"svhn:{tmp_path}:train")


def test_svhn_with_wrong_array_shapes_is_refused(tmp_path: Path) -> None:
    scipy.io.savemat(
        str(tmp_path / "test_32x32.mat"),
        {"X": np.zeros((28, 28, 3, 2), np.uint8), "y": np.ones((2, 1))},
    )
    with pytest.raises(DataError, match="expected 32 x 32 x 3 x N"):
        load_dataset(f"svhn:{tmp_path}:test")
