"""folder: specs: recursive image files, ImageFolder labels, EXIF orientation, bit depths, errors."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from sdns_monitor.data import load_dataset
from sdns_monitor.errors import DataError

RED, GREEN, BLUE = (255, 0, 0), (0, 255, 0), (0, 0, 255)


def _solid(
    path: Path, colour: tuple[int, int, int], size: tuple[int, int] = (8, 6), **save
) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, colour).save(path, **save)


@pytest.fixture
def class_folder(tmp_path: Path) -> Path:
    """cats/ (PNG, WebP), dogs/ (JPEG, nested), plus files that are not images."""
    _solid(tmp_path / "cats" / "b.png", RED)
    _solid(tmp_path / "cats" / "a.WEBP", GREEN, lossless=True)
    _solid(tmp_path / "dogs" / "deep" / "c.JPG", BLUE, quality=95)
    (tmp_path / "cats" / "notes.txt").write_text("not an image")
    (tmp_path / "empty").mkdir()
    return tmp_path


def test_imagefolder_layout_gives_sorted_class_labels_and_sorted_sources(
    class_folder: Path,
) -> None:
    ds = load_dataset(f"folder:{class_folder}")
    assert ds.images.shape == (3, 6, 8, 3) and ds.images.dtype == np.uint8
    assert ds.sources == [
        str(class_folder / "cats" / "a.WEBP"),
        str(class_folder / "cats" / "b.png"),
        str(class_folder / "dogs" / "deep" / "c.JPG"),
    ]
    assert ds.labels is not None and ds.labels.tolist() == [0, 0, 1]
    np.testing.assert_array_equal(ds.images[0, 0, 0], GREEN)  # lossless WebP
    np.testing.assert_array_equal(ds.images[1, 0, 0], RED)
    assert np.abs(ds.images[2].astype(int) - BLUE).max() <= 4  # JPEG is lossy


def test_class_filter_keeps_sources_aligned(class_folder: Path) -> None:
    ds = load_dataset(f"folder:{class_folder}@1")
    assert ds.sources == [str(class_folder / "dogs" / "deep" / "c.JPG")]
    assert ds.labels is not None and ds.labels.tolist() == [1]


def test_images_directly_in_the_root_mean_no_labels(tmp_path: Path) -> None:
    _solid(tmp_path / "top.png", RED)
    _solid(tmp_path / "sub" / "inner.png", BLUE)
    ds = load_dataset(f"folder:{tmp_path}")
    assert ds.labels is None and len(ds) == 2


def test_all_grayscale_images_give_one_channel_mixed_give_rgb(tmp_path: Path) -> None:
    Image.new("L", (5, 4), 77).save(tmp_path / "g1.png")
    Image.new("L", (5, 4), 200).save(tmp_path / "g2.png")
    gray = load_dataset(f"folder:{tmp_path}")
    assert gray.images.shape == (2, 4, 5, 1)
    assert gray.images[:, 0, 0, 0].tolist() == [77, 200]
    Image.new("RGBA", (5, 4), (10, 20, 30, 0)).save(tmp_path / "rgba.png")
    mixed = load_dataset(f"folder:{tmp_path}")
    assert mixed.images.shape == (3, 4, 5, 3)
    assert mixed.images[0, 0, 0].tolist() == [77, 77, 77]  # gray repeated to RGB
    assert mixed.images[2, 0, 0].tolist() == [10, 20, 30]  # alpha dropped, colour kept


def test_16_bit_png_is_scaled_to_8_bits(tmp_path: Path) -> None:
    pixels = np.array([[0, 257 * 100, 65535, 257 * 3 + 100]], dtype=np.uint16)
    Image.fromarray(pixels).save(tmp_path / "deep.png")
    ds = load_dataset(f"folder:{tmp_path}")
    assert ds.images.shape == (1, 1, 4, 1)
    assert ds.images[0, 0, :, 0].tolist() == [0, 100, 255, 3]


def test_exif_orientation_is_applied(tmp_path: Path) -> None:
    # Stored 40 wide x 20 high, left half red; orientation 6 means "rotate 90 degrees clockwise
    # to display", so the displayed image is 20 wide x 40 high with the red half on top.
    stored = Image.new("RGB", (40, 20), BLUE)
    stored.paste(RED, (0, 0, 20, 20))
    exif = Image.Exif()
    exif[0x0112] = 6
    stored.save(tmp_path / "phone.jpg", exif=exif, quality=95)
    ds = load_dataset(f"folder:{tmp_path}")
    assert ds.images.shape == (1, 40, 20, 3)
    top, bottom = ds.images[0, 5, 10].astype(int), ds.images[0, 35, 10].astype(int)
    assert np.abs(top - RED).max() < 10 and np.abs(bottom - BLUE).max() < 10


def test_differing_sizes_need_a_size_and_are_resized_with_one(tmp_path: Path) -> None:
    _solid(tmp_path / "a.png", RED, (8, 6))
    _solid(tmp_path / "b.png", GREEN, (30, 10))
    with pytest.raises(DataError, match=r"2 different sizes.*pass a size"):
        load_dataset(f"folder:{tmp_path}")
    ds = load_dataset(f"folder:{tmp_path}", size=12)
    assert ds.images.shape == (2, 12, 12, 3)
    assert ds.images[1, 6, 6].tolist() == list(GREEN)
    gray = load_dataset(f"folder:{tmp_path}", size=12, channels=1)
    assert gray.images.shape == (2, 12, 12, 1)


def test_unreadable_image_names_the_file_and_the_spec(tmp_path: Path) -> None:
    _solid(tmp_path / "good.png", RED)
    (tmp_path / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 definitely not a jpeg")
    spec = f"folder:{tmp_path}"
    with pytest.raises(DataError, match=rf"^{spec}: cannot decode image .*broken\.jpg"):
        load_dataset(spec)


def test_truncated_png_is_unreadable(tmp_path: Path) -> None:
    _solid(tmp_path / "whole.png", RED, (64, 64))
    raw = (tmp_path / "whole.png").read_bytes()
    (tmp_path / "whole.png").write_bytes(raw[: len(raw) // 2])
    with pytest.raises(DataError, match=r"whole\.png"):
        load_dataset(f"folder:{tmp_path}")


def test_empty_and_missing_folders(tmp_path: Path) -> None:
    (tmp_path / "readme.txt").write_text("no images here")
    with pytest.raises(DataError, match=r"no \.jpg, \.jpeg, \.png or \.webp files"):
        load_dataset(f"folder:{tmp_path}")
    with pytest.raises(DataError, match="is not a directory"):
        load_dataset(f"folder:{tmp_path / 'missing'}")
