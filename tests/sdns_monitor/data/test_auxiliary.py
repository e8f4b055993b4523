"""textures and photos: deterministic RGB crops of the images bundled with skimage/sklearn."""

from __future__ import annotations

import numpy as np
import pytest

from sdns_monitor.data import load_dataset
from sdns_monitor.errors import DataError


def test_textures_are_deterministic_unlabelled_rgb_crops() -> None:
    a, b = load_dataset("textures:100"), load_dataset("textures:100")
    assert a.images.shape == (100, 64, 64, 3) and a.images.dtype == np.uint8
    assert a.labels is None and a.sources is None
    np.testing.assert_array_equal(a.images, b.images)
    assert a.images is not b.images
    # Crops differ from one another and carry structure, not flat colour.
    assert len({img.tobytes() for img in a.images}) == 100
    assert a.images.reshape(100, -1).std(axis=1).min() > 1


def test_fewer_crops_are_a_prefix_of_more() -> None:
    few, more = load_dataset("textures:10"), load_dataset("textures:100")
    np.testing.assert_array_equal(few.images, more.images[:10])


def test_photos_hold_colour_and_grey_sources() -> None:
    ds = load_dataset("photos:200")
    assert ds.images.shape == (200, 64, 64, 3)
    spread = ds.images.astype(int).max(axis=-1) - ds.images.astype(int).min(axis=-1)
    colour = spread.reshape(200, -1).max(axis=1) > 30
    assert colour.any() and (~colour).any()  # e.g. astronaut and camera


def test_size_cuts_the_same_crops_at_another_resolution() -> None:
    small = load_dataset("textures:20", size=16)
    assert small.images.shape == (20, 16, 16, 3)
    base = load_dataset("textures:20").images.reshape(20, -1).mean(axis=1)
    assert np.corrcoef(small.images.reshape(20, -1).mean(axis=1), base)[0, 1] > 0.95


def test_auxiliary_data_has_no_classes_to_filter() -> None:
    with pytest.raises(DataError, match="has no labels"):
        load_dataset("textures:10@1")
