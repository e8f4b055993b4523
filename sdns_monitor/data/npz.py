"""Arrays saved with ``np.savez``: ``images`` (uint8 N x H x W or N x H x W x C) and optional ``labels``."""

from __future__ import annotations

import zipfile
from pathlib import Path

import numpy as np

from sdns_monitor.data.spec import usage
from sdns_monitor.errors import DataError
from sdns_monitor.preprocess import to_channels


def load_npz(path: str, *, spec: str) -> tuple[np.ndarray, np.ndarray | None]:
    """(images uint8 N x H x W x C with C in 1, 3, labels int64 N or None) from an .npz file.

    Alpha (C = 4) is dropped. Object arrays are refused (no pickle is ever loaded).
    """
    file = Path(path).expanduser()
    if not file.is_file():
        raise DataError(f"{spec}: {file} not found; {usage()}")
    try:
        with np.load(file, allow_pickle=False) as npz:
            if "images" not in npz.files:
                raise DataError(
                    f"{spec}: {file} has no array named 'images' (found {', '.join(npz.files)}); "
                    "save with np.savez(path, images=..., labels=...)"
                )
            images = npz["images"]
            labels = npz["labels"] if "labels" in npz.files else None
    except DataError:
        raise
    except (OSError, ValueError, zipfile.BadZipFile, EOFError) as exc:
        raise DataError(f"{spec}: cannot read {file} as .npz ({exc})") from exc

    if images.dtype != np.uint8:
        raise DataError(f"{spec}: 'images' is {images.dtype}; convert to uint8 (0..255) first")
    if images.ndim == 3:
        images = images[..., None]
    if images.ndim != 4 or images.shape[-1] not in (1, 3, 4):
        raise DataError(
            f"{spec}: 'images' has shape {images.shape}; expected N x H x W or N x H x W x C "
            "with C in 1, 3, 4"
        )
    if images.shape[-1] == 4:
        images = to_channels(images, 3)
    if labels is None:
        return images, None
    if labels.ndim != 1 or labels.shape[0] != images.shape[0] or labels.dtype.kind not in "iub":
        raise DataError(
            f"{spec}: 'labels' is {labels.dtype} {labels.shape}; expected integers of shape "
            f"({images.shape[0]},)"
        )
    return images, labels.astype(np.int64)
