"""Fashion-MNIST from the IDX files of the Debian package dataset-fashion-mnist."""

from __future__ import annotations

import functools
import os
from pathlib import Path

import numpy as np

from sdns_monitor.data.idx import read_idx
from sdns_monitor.errors import DataError

DEFAULT_DIR = "/usr/share/datasets/fashion-mnist"
ENV_VAR = "SDNS_FASHION_MNIST_DIR"
_PREFIX = {"train": "train", "test": "t10k"}


def fashion_dir() -> Path:
    """The directory holding the IDX files: $SDNS_FASHION_MNIST_DIR, else the Debian path."""
    return Path(os.environ.get(ENV_VAR) or DEFAULT_DIR)


def load_fashion(split: str) -> tuple[np.ndarray, np.ndarray]:
    """(images uint8 N x 28 x 28 x 1, labels int64 N) for split train (60k) or test (10k).

    The arrays are shared with an in-process cache and read-only; copy before writing.
    """
    return _load(fashion_dir(), split)


@functools.lru_cache(maxsize=4)
def _load(root: Path, split: str) -> tuple[np.ndarray, np.ndarray]:
    prefix = _PREFIX[split]
    files = [root / f"{prefix}-images-idx3-ubyte.gz", root / f"{prefix}-labels-idx1-ubyte.gz"]
    for path in files:
        if not path.is_file():
            raise DataError(
                f"Fashion-MNIST file {path} not found; run `apt-get install dataset-fashion-mnist` "
                f"or set {ENV_VAR} to a directory holding the IDX files"
            )
    images, labels = read_idx(files[0]), read_idx(files[1])
    if images.ndim != 3 or images.dtype != np.uint8 or labels.shape != (images.shape[0],):
        raise DataError(
            f"{root}: unexpected Fashion-MNIST arrays (images {images.dtype} {images.shape}, "
            f"labels {labels.shape})"
        )
    images = images[..., None]
    labels = labels.astype(np.int64)
    images.flags.writeable = False
    labels.flags.writeable = False
    return images, labels
