"""load_dataset: a spec string in, an ImageSet out."""

from __future__ import annotations

import numpy as np

from sdns_monitor.data.animals import load_animals
from sdns_monitor.data.auxiliary import load_crops
from sdns_monitor.data.cifar import load_cifar
from sdns_monitor.data.fashion import load_fashion
from sdns_monitor.data.folder import load_folder
from sdns_monitor.data.imageset import ImageSet
from sdns_monitor.data.kafka_topic import load_topic
from sdns_monitor.data.mnist import load_mnist
from sdns_monitor.data.npz import load_npz
from sdns_monitor.data.spec import DatasetSpec, parse_spec
from sdns_monitor.data.svhn import load_svhn
from sdns_monitor.errors import DataError
from sdns_monitor.preprocess import resize_uint8, to_channels


def load_dataset(spec: str, *, size: int | None = None, channels: int | None = None) -> ImageSet:
    """Load the images a spec string names (see `sdns_monitor.data.spec` for the grammar).

    size: if given, every image is resized to size x size (`preprocess.resize_uint8`).
    channels: if given (1 or 3), images are converted with `preprocess.to_channels`.
    A ``@CLASSES`` suffix keeps only those labels. The returned arrays are the caller's own.

    >>> mnist = load_dataset("mnist:test@0-4", size=32, channels=3)
    >>> mnist.images.shape, mnist.labels[:3]
    ((5139, 32, 32, 3), array([2, 1, 0]))
    """
    if size is not None and size <= 0:
        raise DataError(f"{spec}: size must be a positive number of pixels, got {size}")
    if channels not in (None, 1, 3):
        raise DataError(f"{spec}: channels must be 1 or 3, got {channels}")
    parsed = parse_spec(spec)
    try:
        images, labels, sources = _read(parsed, spec, size)
    except DataError as exc:
        if spec in str(exc):
            raise
        raise DataError(f"{spec}: {exc}") from exc  # every message names the spec

    if parsed.classes is not None:
        if labels is None:
            raise DataError(f"{spec}: this data has no labels, so it cannot be filtered by class")
        keep = np.isin(labels, parsed.classes)
        if not keep.any():
            present = ", ".join(str(c) for c in np.unique(labels)[:20])
            raise DataError(
                f"{spec}: no images with classes {parsed.classes}; labels are {present}"
            )
        images, labels = images[keep], labels[keep]
        sources = None if sources is None else [s for s, k in zip(sources, keep, strict=True) if k]

    # Readers may hand out their cached read-only arrays; give the caller a copy to own.
    if not images.flags.writeable:
        images = images.copy()
    if labels is not None and not labels.flags.writeable:
        labels = labels.copy()
    if channels is not None:
        images = to_channels(images, channels)
    if size is not None:
        images = resize_uint8(images, size)
    return ImageSet(images=images, labels=labels, sources=sources, spec=spec)


def _read(
    parsed: DatasetSpec, spec: str, size: int | None
) -> tuple[np.ndarray, np.ndarray | None, list[str] | None]:
    """Dispatch to the reader of `parsed.name`: (images, labels or None, sources or None)."""
    name, args = parsed.name, parsed.args
    if name == "mnist":
        return (*load_mnist(args[0]), None)
    if name == "fashion-mnist":
        return (*load_fashion(args[0]), None)
    if name == "animals":
        return (*load_animals(), None)
    if name in ("textures", "photos"):
        return load_crops(name, int(args[0]), size), None, None
    if name == "folder":
        folder = load_folder(args[0], spec=spec, size=size)
        return folder.images, folder.labels, folder.sources
    if name == "npz":
        return (*load_npz(args[0], spec=spec), None)
    if name in ("cifar10", "cifar100"):
        return (*load_cifar(name, args[0], args[1], spec=spec), None)
    if name == "svhn":
        return (*load_svhn(args[0], args[1], spec=spec), None)
    if name == "kafka":
        servers, topic, limit, timeout = args
        max_frames = None if limit == "all" else int(limit)
        read = load_topic(
            servers, topic, max_frames=max_frames, timeout_s=float(timeout), spec=spec, size=size
        )
        return read.images, None, read.sources
    raise AssertionError(f"parse_spec accepted {name!r} but no reader handles it")
