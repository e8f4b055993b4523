"""Animal silhouettes from the pip package animal-mnist (10k 28 x 28, 10 classes).

The package holds two gzipped pickles of bare numpy arrays, ``animal_data_version_3.gz``
(uint8 10000 x 28 x 28) and ``animal_label_version_3.gz`` (int64 10000, sorted by class,
1000 per class); there is no train/test split.
"""

from __future__ import annotations

import functools
import gzip

import numpy as np

from sdns_monitor.data.packaged import package_file
from sdns_monitor.data.safe_pickle import safe_load
from sdns_monitor.errors import DataError

INSTALL = "pip install --no-deps animal-mnist==0.4"
_DIR = "animal_mnist/data/Animal_MNIST/"


@functools.lru_cache(maxsize=1)
def load_animals() -> tuple[np.ndarray, np.ndarray]:
    """(images uint8 10000 x 28 x 28 x 1, labels int64 10000), shared and read-only."""
    images = _read_array("animal_data_version_3.gz").astype(np.uint8, copy=False)
    labels = _read_array("animal_label_version_3.gz").astype(np.int64, copy=False)
    if images.ndim != 3 or labels.shape != (images.shape[0],):
        raise DataError(
            f"animal-mnist has an unexpected layout (images {images.shape}, labels "
            f"{labels.shape}); reinstall with: {INSTALL}"
        )
    images = images[..., None]
    images.flags.writeable = False
    labels.flags.writeable = False
    return images, labels


def _read_array(name: str) -> np.ndarray:
    path = package_file("animal-mnist", _DIR + name, install=INSTALL)
    try:
        with gzip.open(path, "rb") as f:
            raw = f.read()
    except OSError as exc:
        raise DataError(f"cannot read {path} ({exc}); reinstall with: {INSTALL}") from exc
    array = safe_load(raw, source=str(path))
    if not isinstance(array, np.ndarray):
        raise DataError(f"{path} does not hold a numpy array; reinstall with: {INSTALL}")
    return array
