"""Auxiliary images: random crops of the large images that ship with scikit-image and scikit-learn.

Meant as varied natural content (``photos``) or texture (``textures``), e.g. as outliers that
are not the reference data. Only images bundled in the installed wheels are used; those that
skimage would download (brain, eagle, lily, skin, ...) are never requested.
"""

from __future__ import annotations

import functools
import warnings
from collections.abc import Callable

import numpy as np
from PIL import Image

from sdns_monitor.errors import DataError

CROP_SIZE = 64
SEED = 0

# skimage.data names bundled with the wheel (checked with scikit-image 0.26). `cat` is left
# out: it is the same picture as `chelsea`. Photos also get sklearn's china.jpg and flower.jpg.
TEXTURES = ("brick", "grass", "gravel", "immunohistochemistry")
PHOTOS = (
    "astronaut",
    "camera",
    "chelsea",
    "coffee",
    "rocket",
    "coins",
    "clock",
    "moon",
    "hubble_deep_field",
)


def load_crops(kind: str, count: int, size: int | None = None) -> np.ndarray:
    """`count` uint8 RGB crops (count x S x S x 3, S = `size` or 64) of `kind` textures or photos.

    Deterministic (seed 0): each crop picks a source image uniformly, a square side between 1/8
    and 1/2 of that image's shorter side, and a position, and is resized to S x S. The same
    crops are cut whatever `size` is. Shared with an in-process cache and read-only.
    Resizing uses PIL's antialiased bilinear filter (about one grey level from
    `preprocess.resize_uint8`, and some 30x faster per crop).
    """
    return _crops(kind, count, CROP_SIZE if size is None else size)


@functools.lru_cache(maxsize=8)
def _crops(kind: str, count: int, size: int) -> np.ndarray:
    sources = _sources(kind)
    rng = np.random.default_rng(SEED)
    out = np.empty((count, size, size, 3), dtype=np.uint8)
    for i in range(count):
        image = sources[rng.integers(len(sources))]
        h, w = image.shape[:2]
        short = min(h, w)
        side = int(rng.integers(max(1, short // 8), short // 2 + 1))
        top, left = int(rng.integers(h - side + 1)), int(rng.integers(w - side + 1))
        crop = Image.fromarray(image[top : top + side, left : left + side])
        out[i] = np.asarray(crop.resize((size, size), Image.Resampling.BILINEAR))
    out.flags.writeable = False
    return out


@functools.lru_cache(maxsize=2)
def _sources(kind: str) -> tuple[np.ndarray, ...]:
    import skimage.data  # deferred: importing skimage takes a while

    names = TEXTURES if kind == "textures" else PHOTOS
    loaders: list[Callable[[], np.ndarray | list[np.ndarray]]] = [
        getattr(skimage.data, n) for n in names if hasattr(skimage.data, n)
    ]
    if kind == "photos":
        loaders.append(_sklearn_photos)
    images: list[np.ndarray] = []
    for load in loaders:
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                loaded = load()
            images += [_as_rgb(a) for a in (loaded if isinstance(loaded, list) else [loaded])]
        except Exception:  # an image that would need a download, or is not 8-bit: skip it
            continue
    if not images:
        raise DataError(
            f"no {kind} images could be loaded from scikit-image/scikit-learn; "
            "reinstall scikit-image (pip install scikit-image)"
        )
    return tuple(images)


def _sklearn_photos() -> list[np.ndarray]:
    from sklearn.datasets import load_sample_images

    return list(load_sample_images().images)


def _as_rgb(image: np.ndarray) -> np.ndarray:
    image = np.asarray(image)
    if image.dtype != np.uint8:
        raise TypeError(f"expected uint8, got {image.dtype}")
    if image.ndim == 2:
        image = np.repeat(image[..., None], 3, axis=-1)
    return np.array(image[..., :3], copy=True, order="C")  # skimage's arrays are read-only
