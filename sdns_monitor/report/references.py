"""The reference images behind the bundle's features (`--reference`), for neighbour thumbnails.

The bundle keeps the reference features, not the images: they are rebuilt from the data the
bundle was fitted on, the way `fit` split them, and accepted only if they match the manifest's
training-data fingerprint and give the stored features.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from typing import Any

import numpy as np

from sdns_monitor.bundle import FEATURES, Manifest
from sdns_monitor.detector import Detector
from sdns_monitor.errors import DataError
from sdns_monitor.report.gallery import FrameRow


def _fingerprint(images: np.ndarray) -> str:
    """SHA-256 of images as `fit` records it (trainer.fit.fingerprint)."""
    h = hashlib.sha256()
    h.update(str(images.shape).encode())
    h.update(np.ascontiguousarray(images).tobytes())
    return h.hexdigest()


def _training_split(images: np.ndarray, config: dict[str, Any]) -> np.ndarray:
    """The training images of `fit`'s seeded split (trainer.fit.split_reference, mirrored here
    because scoring code never imports the trainer; the fingerprint check catches any drift)."""
    n = len(images)
    order = np.random.default_rng(config["seed"]).permutation(n)
    n_cal = min(config["max_calibration"], max(1, round(config["calibration_fraction"] * n)))
    n_val = round(config["validation_fraction"] * (n - n_cal))
    return images[np.sort(order[n_cal + n_val :])]


def reference_images(
    manifest: Manifest, spec: str, n_features: int, log: Callable[[str], None] = lambda _m: None
) -> np.ndarray:
    """The images behind the bundle's reference features (row i of features.npy is image i),
    rebuilt from `spec`, the data the bundle was fitted on.

    Raises DataError unless the rebuilt training images have the manifest's fingerprint.
    """
    from sdns_monitor.data import load_dataset, parse_spec
    from sdns_monitor.preprocess import prepare_uint8

    training = manifest.training
    config = training.config
    needed = ("seed", "max_calibration", "calibration_fraction", "validation_fraction")
    if not training.fingerprint or any(key not in config for key in needed):
        raise DataError(
            f"--reference {spec}: this bundle records no training-data fingerprint and split "
            "(it was not written by `sdns-monitor fit`), so the images cannot be checked; "
            "leave out --reference to list neighbour indices"
        )
    size, channels = manifest.input.size, manifest.input.channels
    log(f"rebuilding the reference images from {spec}")
    # fit loads image folders at the data size, other data at its native size unless
    # --image-size was given; the two differ only where colour images are resized.
    folder = parse_spec(spec).name == "folder"
    loaded = load_dataset(spec, size=size if folder else None).images
    train = _training_split(prepare_uint8(loaded, size, channels), config)
    if _fingerprint(train) != training.fingerprint and loaded.shape[1:3] != (size, size):
        loaded = load_dataset(spec, size=size).images
        train = _training_split(prepare_uint8(loaded, size, channels), config)
    if _fingerprint(train) != training.fingerprint:
        raise DataError(
            f"--reference {spec} is not the data this bundle was fitted on (its training split "
            f"does not match the manifest's fingerprint {training.fingerprint[:12]}...); pass "
            f"the spec of `fit --data` ({training.data or 'not recorded'}) with the same files"
        )
    bank_size = config.get("bank_size")
    if bank_size is not None and bank_size < len(train):  # fit's seeded subset of the bank
        pick = np.random.default_rng(config["seed"] + 1).choice(
            len(train), bank_size, replace=False
        )
        train = train[np.sort(pick)]
    if len(train) != n_features:
        raise DataError(
            f"--reference {spec}: rebuilt {len(train)} reference images for the bundle's "
            f"{n_features} reference features; the bundle's bank was built differently"
        )
    return train


def check_neighbours(det: Detector, bank: np.ndarray, rows: list[FrameRow]) -> None:
    """The rebuilt images of the neighbours shown must give the bundle's stored features
    (cosine >= 0.99), so a thumbnail never shows an image the index does not hold."""
    ids = np.unique(np.concatenate([r.neighbour_ids for r in rows]))
    if ids.size == 0:
        return
    rebuilt = det.features(bank[ids]).cpu().numpy()
    cosine = np.sum(rebuilt * det.bundle.features[ids], axis=1)
    if float(cosine.min()) < 0.99:
        raise DataError(
            f"the rebuilt reference images do not give the bundle's {FEATURES} (cosine "
            f"{float(cosine.min()):.3f}); leave out --reference to list neighbour indices"
        )
