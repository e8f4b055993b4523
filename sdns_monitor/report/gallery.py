"""The frames the page shows (`--frames`): loaded, scored, and their nearest reference
features."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from sdns_monitor.detector import Detector
from sdns_monitor.errors import DataError, FrameError


@dataclass(frozen=True)
class FrameRow:
    """One frame on the page: what the model saw, its result and its nearest references."""

    source: str
    image: np.ndarray  # uint8 H x W x C at the model's input size
    score: float
    p_value: float
    flagged: bool
    neighbour_ids: np.ndarray  # int64 (k,): rows of the bundle's features.npy
    neighbour_distances: np.ndarray  # cosine distances 1 - <z, z_i>


def load_frames(
    values: Sequence[str], size: int, channels: int, max_frames: int
) -> tuple[np.ndarray, list[str]]:
    """Frames from image files (PNG, JPEG, WebP, .npy), directories of images or dataset
    specs, in the order given, prepared for the model (uint8 N x size x size x channels), and
    where each came from. `max_frames` is shared between the values: each takes its first
    frames, up to an even share of what the values before it left."""
    from sdns_monitor.data import load_dataset, parse_spec, usage
    from sdns_monitor.frames import decode_bytes
    from sdns_monitor.preprocess import prepare_uint8

    parts: list[np.ndarray] = []
    sources: list[str] = []
    for position, value in enumerate(values):
        left = math.ceil((max_frames - len(sources)) / (len(values) - position))
        if left <= 0:
            break
        path = Path(value)
        if path.is_file():
            try:
                frames = decode_bytes(path.read_bytes())[:left]
            except FrameError as exc:
                raise FrameError(f"--frames {value}: {exc}") from None
            names = [value] if len(frames) == 1 else [f"{value}[{i}]" for i in range(len(frames))]
        else:
            spec = f"folder:{value}" if path.is_dir() else value
            try:
                parse_spec(spec)
            except DataError:
                raise DataError(
                    f"--frames {value}: no such file, and not a dataset spec ({usage()})"
                ) from None
            data = load_dataset(spec, size=size)
            frames = data.images[:left]
            names = (data.sources or [f"{spec}[{i}]" for i in range(len(data))])[:left]
        parts.append(prepare_uint8(frames, size, channels))
        sources.extend(names)
    if not sources:
        raise DataError("--frames gave no images; pass image files, a directory or a spec")
    return np.concatenate(parts), sources


def score_frames(
    det: Detector,
    images: np.ndarray,
    sources: list[str],
    neighbours: int,
    alarm_rate: float | None = None,
) -> list[FrameRow]:
    """Score, p-value and flag of each frame (as `Detector.score`), and its `neighbours`
    nearest reference features (the encoder's features, whatever the score mode)."""
    prepared = det.prepare(images)
    result = det.score(prepared, alarm_rate=alarm_rate)
    k = min(neighbours, len(det.index))
    sims, ids = det.index.neighbours(det.features(prepared), k)
    rows = []
    for i, source in enumerate(sources):
        found = ids[i] >= 0  # an approximate index may find fewer than k
        rows.append(
            FrameRow(
                source=source,
                image=prepared[i],
                score=float(result.scores[i]),
                p_value=float(result.p_values[i]),
                flagged=bool(result.flags[i]),
                neighbour_ids=ids[i][found].astype(np.int64),
                neighbour_distances=(1.0 - sims[i].numpy())[found],
            )
        )
    return rows
