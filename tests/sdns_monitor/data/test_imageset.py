"""ImageSet keeps images, labels and sources aligned, and rejects malformed arrays."""

from __future__ import annotations

import numpy as np
import pytest

from sdns_monitor.data import ImageSet


def _set(n: int = 5) -> ImageSet:
    images = np.arange(n, dtype=np.uint8)[:, None, None, None] * np.ones((1, 2, 2, 1), np.uint8)
    return ImageSet(images, np.arange(n, dtype=np.int64) * 10, [f"f{i}" for i in range(n)], "x")


def test_subset_by_indices_keeps_everything_aligned() -> None:
    sub = _set().subset(np.array([3, 0]))
    assert len(sub) == 2
    assert sub.images[:, 0, 0, 0].tolist() == [3, 0]
    assert sub.labels is not None and sub.labels.tolist() == [30, 0]
    assert sub.sources == ["f3", "f0"]
    assert sub.spec == "x"


def test_subset_by_mask() -> None:
    full = _set()
    sub = full.subset(np.array([True, False, True, False, False]))
    assert sub.sources == ["f0", "f2"]
    assert sub.labels is not None and sub.labels.tolist() == [0, 20]
    with pytest.raises(IndexError):
        full.subset(np.array([True, False]))


def test_subset_without_labels_or_sources() -> None:
    s = ImageSet(np.zeros((3, 4, 4, 3), np.uint8), None, None, "y")
    sub = s.subset(np.array([2]))
    assert sub.labels is None and sub.sources is None and sub.images.shape == (1, 4, 4, 3)


@pytest.mark.parametrize(
    ("images", "labels"),
    [
        (np.zeros((2, 4, 4, 3), np.float32), None),
        (np.zeros((2, 4, 4), np.uint8), None),
        (np.zeros((2, 4, 4, 4), np.uint8), None),
        (np.zeros((2, 4, 4, 1), np.uint8), np.zeros(3, np.int64)),
    ],
)
def test_malformed_imagesets_are_rejected(images: np.ndarray, labels: np.ndarray | None) -> None:
    with pytest.raises(ValueError):
        ImageSet(images, labels, None, "z")
