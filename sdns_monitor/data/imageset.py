"""ImageSet: the images, labels and origins that every dataset reader returns."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True, eq=False)  # eq=False: comparing arrays element-wise is not equality
class ImageSet:
    """uint8 images N x H x W x C (C in 1, 3) with optional labels and per-image sources.

    `labels` is int64 (N,) or None when the source has no labels; `sources` holds each image's
    origin (a file path for ``folder:``) or is None; `spec` is the spec string it came from.
    """

    images: np.ndarray
    labels: np.ndarray | None
    sources: list[str] | None
    spec: str

    def __post_init__(self) -> None:
        shape = self.images.shape
        if self.images.dtype != np.uint8 or self.images.ndim != 4 or shape[-1] not in (1, 3):
            raise ValueError(
                f"ImageSet needs uint8 N x H x W x C images with C in 1, 3; "
                f"got {self.images.dtype} {shape}"
            )
        if self.labels is not None and self.labels.shape != (shape[0],):
            raise ValueError(f"labels shape {self.labels.shape} does not match {shape[0]} images")
        if self.sources is not None and len(self.sources) != shape[0]:
            raise ValueError(f"{len(self.sources)} sources for {shape[0]} images")

    def __len__(self) -> int:
        return int(self.images.shape[0])

    def subset(self, idx: np.ndarray) -> ImageSet:
        """The images at `idx` (integer indices or a boolean mask), labels and sources aligned.

        >>> first_ten = images.subset(np.arange(10))
        """
        idx = np.asarray(idx)
        if idx.dtype == bool:
            if idx.shape != (len(self),):
                raise IndexError(f"boolean mask of shape {idx.shape} for {len(self)} images")
            idx = np.flatnonzero(idx)
        idx = idx.astype(np.int64, copy=False)
        return ImageSet(
            images=self.images[idx],
            labels=None if self.labels is None else self.labels[idx],
            sources=None if self.sources is None else [self.sources[i] for i in idx],
            spec=self.spec,
        )
