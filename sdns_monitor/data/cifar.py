"""CIFAR-10 and CIFAR-100 in the standard "python version" layout.

CIFAR-10: ``cifar-10-batches-py/data_batch_1..5`` and ``test_batch``; CIFAR-100:
``cifar-100-python/train`` and ``test``. Each file is a pickled dict with bytes keys:
``b"data"`` uint8 N x 3072 (the red, green, then blue 32 x 32 planes, rows in order) and
``b"labels"`` (CIFAR-10) or ``b"fine_labels"`` (CIFAR-100). The root may be the folder that
holds the batches folder or the batches folder itself. Files are unpickled with SafeUnpickler,
so a tampered file cannot run code.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from sdns_monitor.data.safe_pickle import safe_load
from sdns_monitor.errors import DataError

_LAYOUT = {
    "cifar10": (
        "cifar-10-batches-py",
        {"train": [f"data_batch_{i}" for i in range(1, 6)], "test": ["test_batch"]},
        b"labels",
    ),
    "cifar100": ("cifar-100-python", {"train": ["train"], "test": ["test"]}, b"fine_labels"),
}
_URL = {
    "cifar10": "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz",
    "cifar100": "https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz",
}


def load_cifar(name: str, root: str, split: str, *, spec: str) -> tuple[np.ndarray, np.ndarray]:
    """(images uint8 N x 32 x 32 x 3, labels int64 N) of `name` (cifar10 or cifar100)."""
    folder_name, files, label_key = _LAYOUT[name]
    folder = _batches_folder(
        Path(root).expanduser(), folder_name, files[split], spec=spec, name=name
    )
    images, labels = [], []
    for file_name in files[split]:
        path = folder / file_name
        x, y = _read_batch(path, label_key, spec=spec)
        images.append(x)
        labels.append(y)
    return np.concatenate(images), np.concatenate(labels)


def _batches_folder(
    root: Path, folder_name: str, files: list[str], *, spec: str, name: str
) -> Path:
    for folder in (root / folder_name, root):
        if all((folder / f).is_file() for f in files):
            return folder
    raise DataError(
        f"{spec}: no {', '.join(files)} under {root} or {root / folder_name}; point the spec at "
        f"the folder where {_URL[name]} was extracted"
    )


def _read_batch(path: Path, label_key: bytes, *, spec: str) -> tuple[np.ndarray, np.ndarray]:
    try:
        with path.open("rb") as f:
            batch = safe_load(f, source=f"{spec}: {path}", encoding="bytes")
    except OSError as exc:
        raise DataError(f"{spec}: cannot read {path}: {exc}") from exc
    if not isinstance(batch, dict) or b"data" not in batch or label_key not in batch:
        keys = sorted(batch) if isinstance(batch, dict) else type(batch).__name__
        raise DataError(
            f"{spec}: {path} is not a CIFAR batch (expected keys b'data' and {label_key!r}, "
            f"found {keys})"
        )
    data = np.asarray(batch[b"data"])
    labels = np.asarray(batch[label_key], dtype=np.int64)
    if data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3 * 32 * 32:
        raise DataError(f"{spec}: {path} b'data' is {data.dtype} {data.shape}, not uint8 N x 3072")
    if labels.shape != (data.shape[0],):
        raise DataError(f"{spec}: {path} has {data.shape[0]} images but {labels.shape} labels")
    # Each row is three 32 x 32 planes (R, G, B); move channels last.
    images = data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)
    return np.ascontiguousarray(images), labels
