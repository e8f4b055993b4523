"""A directory tree of image files (JPEG, PNG, WebP), optionally one subfolder per class."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from sdns_monitor.errors import DataError, FrameError
from sdns_monitor.frames import decode_bytes
from sdns_monitor.preprocess import resize_uint8

EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".webp"})


@dataclass(frozen=True)
class FolderImages:
    """Images of a folder, their labels (None unless ImageFolder-style) and file paths."""

    images: np.ndarray
    labels: np.ndarray | None
    sources: list[str]
    classes: list[str] | None


def image_files(root: Path) -> list[Path]:
    """Image files under `root`, recursively, by extension (case-insensitive), sorted."""
    return sorted(p for p in root.rglob("*") if p.suffix.lower() in EXTENSIONS and p.is_file())


def load_folder(path: str, *, spec: str, size: int | None = None) -> FolderImages:
    """Decode every image under `path` to uint8 N x H x W x C.

    EXIF orientation is applied. C is 1 when every image is grayscale, else 3 (gray images are
    repeated to RGB, alpha is dropped); 16-bit images are scaled to 8 bits. With `size`, each
    image is resized to size x size; without it, all images must share one shape.
    Labels: when every image lies in an immediate subfolder of `path` (``path/CLASS/...``),
    label i is the i-th class folder in sorted order; otherwise None.
    """
    root = Path(path).expanduser()
    if not root.is_dir():
        raise DataError(f"{spec}: {root} is not a directory; give folder:/path/to/images")
    files = image_files(root)
    if not files:
        raise DataError(f"{spec}: no .jpg, .jpeg, .png or .webp files under {root}; check the path")

    decoded = [_decode(f, spec=spec) for f in files]
    all_gray = all(a.ndim == 2 for a in decoded)
    arrays = [
        a[..., None] if all_gray else (np.repeat(a[..., None], 3, axis=-1) if a.ndim == 2 else a)
        for a in decoded
    ]
    if size is not None:
        images = np.concatenate([resize_uint8(a[None], size) for a in arrays])
    else:
        shapes = {a.shape for a in arrays}
        if len(shapes) > 1:
            raise DataError(
                f"{spec}: images have {len(shapes)} different sizes (e.g. "
                f"{', '.join(f'{s[1]}x{s[0]}' for s in sorted(shapes)[:3])}); pass a size to "
                "resize them all"
            )
        images = np.stack(arrays)

    labels, classes = _class_labels(root, files)
    return FolderImages(images, labels, [str(f) for f in files], classes)


def _class_labels(root: Path, files: list[Path]) -> tuple[np.ndarray | None, list[str] | None]:
    parts = [f.relative_to(root).parts for f in files]
    if any(len(p) < 2 for p in parts):  # an image directly in root: not ImageFolder-style
        return None, None
    classes = sorted({p[0] for p in parts})
    index = {c: i for i, c in enumerate(classes)}
    return np.array([index[p[0]] for p in parts], dtype=np.int64), classes


def _decode(path: Path, *, spec: str) -> np.ndarray:
    """uint8 H x W (grayscale) or H x W x 3 (colour) pixels of one file.

    Decoded by `frames.decode_bytes`, the decoder that scores streamed frames, so a reference
    image and the same image arriving on a topic get the same pixels (and the same guards).
    """
    try:
        frame = decode_bytes(path.read_bytes())[0]
    except (OSError, FrameError) as exc:
        raise DataError(
            f"{spec}: cannot decode image {path} ({exc}); remove or fix the file"
        ) from exc
    if frame.shape[-1] == 1:
        return frame[..., 0]
    return np.ascontiguousarray(frame[..., :3])
