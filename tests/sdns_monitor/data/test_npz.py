"""npz files: images uint8 N x H x W (x C), optional integer labels; nothing else is accepted."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from sdns_monitor.data import load_dataset
from sdns_monitor.errors import DataError


def test_grayscale_npz_gets_a_channel_axis_and_labels(tmp_path: Path) -> None:
    images = np.arange(4 * 5 * 6, dtype=np.uint8).reshape(4, 5, 6)
    np.savez(tmp_path / "g.npz", images=images, labels=np.array([3, 1, 3, 0], dtype=np.int32))
    ds = load_dataset(f"npz:{tmp_path / 'g.npz'}")
    assert ds.images.shape == (4, 5, 6, 1)
    np.testing.assert_array_equal(ds.images[..., 0], images)
    assert (
        ds.labels is not None and ds.labels.dtype == np.int64 and ds.labels.tolist() == [3, 1, 3, 0]
    )
    assert ds.sources is None
    only3 = load_dataset(f"npz:{tmp_path / 'g.npz'}@3")
    np.testing.assert_array_equal(only3.images[..., 0], images[[0, 2]])


def test_rgba_npz_drops_alpha_and_unlabelled_npz_has_no_labels(tmp_path: Path) -> None:
    images = np.random.default_rng(0).integers(0, 256, size=(2, 3, 3, 4), dtype=np.uint8)
    np.savez_compressed(tmp_path / "c.npz", images=images)
    ds = load_dataset(f"npz:{tmp_path / 'c.npz'}", size=6)
    assert ds.images.shape == (2, 6, 6, 3) and ds.labels is None
    raw = load_dataset(f"npz:{tmp_path / 'c.npz'}")
    np.testing.assert_array_equal(raw.images, images[..., :3])
    with pytest.raises(DataError, match="has no labels, so it cannot be filtered"):
        load_dataset(f"npz:{tmp_path / 'c.npz'}@1")


@pytest.mark.parametrize(
    ("arrays", "match"),
    [
        ({"images": np.zeros((2, 4, 4), np.float32)}, "'images' is float32; convert to uint8"),
        ({"images": np.zeros((2, 4, 4, 2), np.uint8)}, "'images' has shape"),
        ({"images": np.zeros((4, 4), np.uint8)}, "'images' has shape"),
        ({"pixels": np.zeros((2, 4, 4), np.uint8)}, "no array named 'images' \\(found pixels\\)"),
        ({"images": np.zeros((2, 4, 4), np.uint8), "labels": np.zeros(3, np.int64)}, "'labels' is"),
        (
            {"images": np.zeros((2, 4, 4), np.uint8), "labels": np.zeros(2, np.float32)},
            "'labels' is",
        ),
    ],
)
def test_bad_npz_contents(tmp_path: Path, arrays: dict[str, np.ndarray], match: str) -> None:
    np.savez(tmp_path / "bad.npz", **arrays)  # type: ignore[arg-type]
    with pytest.raises(DataError, match=match):
        load_dataset(f"npz:{tmp_path / 'bad.npz'}")


def test_object_arrays_are_never_unpickled(tmp_path: Path) -> None:
    np.savez(tmp_path / "obj.npz", images=np.array([{"a": 1}, None], dtype=object))
    with pytest.raises(DataError, match=r"cannot read .* as \.npz"):
        load_dataset(f"npz:{tmp_path / 'obj.npz'}")


def test_missing_and_non_npz_files(tmp_path: Path) -> None:
    with pytest.raises(DataError, match=r"npz:.*missing.npz: .*missing.npz not found"):
        load_dataset(f"npz:{tmp_path / 'missing.npz'}")
    (tmp_path / "text.npz").write_text("hello")
    with pytest.raises(DataError, match="cannot read"):
        load_dataset(f"npz:{tmp_path / 'text.npz'}")
