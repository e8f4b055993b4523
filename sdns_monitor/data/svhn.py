"""SVHN (cropped digits) from the standard ``train_32x32.mat``, ``test_32x32.mat``, ``extra_32x32.mat``."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import scipy.io

from sdns_monitor.errors import DataError

_URL = "http://ufldl.stanford.edu/housenumbers/"


def load_svhn(root: str, split: str, *, spec: str) -> tuple[np.ndarray, np.ndarray]:
    """(images uint8 N x 32 x 32 x 3, labels int64 N in 0..9) from ``ROOT/{split}_32x32.mat``.

    The files store X as 32 x 32 x 3 x N and y as N x 1 with the digit 0 written as 10.
    """
    path = Path(root).expanduser() / f"{split}_32x32.mat"
    if not path.is_file():
        raise DataError(
            f"{spec}: {path} not found; download {split}_32x32.mat from {_URL} into {root}"
        )
    try:
        mat = scipy.io.loadmat(str(path), variable_names=["X", "y"])
    except Exception as exc:  # scipy raises ValueError, TypeError, MatReadError...
        raise DataError(f"{spec}: cannot read {path} as a MATLAB file ({exc})") from exc
    if "X" not in mat or "y" not in mat:
        raise DataError(f"{spec}: {path} lacks the X and y arrays of the SVHN format")
    x, y = np.asarray(mat["X"]), np.asarray(mat["y"]).reshape(-1)
    if x.ndim != 4 or x.shape[:3] != (32, 32, 3) or x.shape[3] != y.shape[0]:
        raise DataError(
            f"{spec}: {path} X is {x.shape} and y has {y.shape[0]} labels; "
            "expected 32 x 32 x 3 x N and N"
        )
    if x.dtype != np.uint8:
        raise DataError(f"{spec}: {path} X is {x.dtype}; SVHN images are uint8")
    labels = y.astype(np.int64)
    labels[labels == 10] = 0  # SVHN writes the digit 0 as 10
    if labels.size and (labels.min() < 0 or labels.max() > 9):
        raise DataError(f"{spec}: {path} has labels outside 1..10")
    return np.ascontiguousarray(x.transpose(3, 0, 1, 2)), labels
