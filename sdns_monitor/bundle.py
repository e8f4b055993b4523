"""The model bundle: a directory `NAME.sdns/` that holds everything needed to score.

    manifest.json        format version, backbone, input, score and calibration settings,
                         training record, and the SHA-256 of every other file
    encoder.safetensors  teacher backbone weights (weights only: never pickle)
    features.npy         L2-normalised reference features of the training split (float32)
    calibration.npy      sorted anomaly scores of held-out calibration images (float64)

A bundle is immutable once written: it is written to a temporary sibling and renamed into
place, and every file's hash is checked on load, so a changed, missing or swapped file is
refused before any weight is used. The bundle's identity (`Bundle.hash`) is the SHA-256 of its
manifest, which covers the other files through their hashes. An optional Ed25519 signature
over the manifest (`manifest.sig`, sdns_monitor.signing) proves who wrote it; once a public key
is configured, every bundle must carry one.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Annotated, Any, Literal

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator
from safetensors import SafetensorError
from safetensors.torch import load as load_safetensors
from safetensors.torch import save_file

from sdns_monitor import __version__
from sdns_monitor.errors import BundleError, first_problem
from sdns_monitor.networks import BackboneConfig
from sdns_monitor.scoring import p_values

FORMAT_VERSION = 1
MANIFEST = "manifest.json"
ENCODER = "encoder.safetensors"
FEATURES = "features.npy"
CALIBRATION = "calibration.npy"
REQUIRED_FILES = (ENCODER, FEATURES, CALIBRATION)
# Present when the bundle has the combined score (sdns_monitor.lowlevel).
LOWLEVEL = "lowlevel.npy"
CALIBRATION_COMBINED = "calibration_combined.npy"
LOWLEVEL_FILES = (LOWLEVEL, CALIBRATION_COMBINED)


class InputSpec(BaseModel):
    """How a frame becomes encoder input: resized (uint8) to `size`, converted to `channels`,
    normalised, then upsampled to `model_size` when that is larger."""

    model_config = ConfigDict(extra="forbid")
    size: int = Field(ge=1)
    model_size: int = Field(ge=1)
    channels: Literal[1, 3]
    mean: list[float]
    std: list[Annotated[float, Field(gt=0)]]


LowLevelPart = Literal["pixels", "statistics"]


class StatisticsSpec(BaseModel):
    """The image-statistics part of the combined score (sdns_monitor.lowlevel): which
    statistics, their standardisation over the reference images, the k of the distance."""

    model_config = ConfigDict(extra="forbid")
    names: list[str]
    mean: list[float]
    std: list[Annotated[float, Field(gt=0)]]
    k: int = Field(10, ge=1)
    # mean and std of the statistics score on in-distribution validation images
    score_mean: float
    score_std: float = Field(gt=0)

    @model_validator(mode="after")
    def _lengths(self) -> StatisticsSpec:
        if not len(self.names) == len(self.mean) == len(self.std):
            raise ValueError("statistics names, mean and std need one entry each")
        return self


class LowLevelSpec(BaseModel):
    """The low-level parts of the combined score and how each part is standardised.

    The low-level bank (`lowlevel.npy`) holds per reference image its pooled pixels and, when
    `statistics` is set, its image statistics after them. `parts` are the ones the combined
    score adds to SDNS (chosen on validation data); bundles made before the statistics part
    existed have the pixels alone."""

    model_config = ConfigDict(extra="forbid")
    side: int = Field(ge=1)  # frames are average-pooled to side x side x channels
    temperature: float = Field(0.04, gt=0)
    k: int | None = Field(200, ge=1)
    n_reference: int = 0
    # mean and std of each score on in-distribution validation images (not in either bank)
    sdns_mean: float
    sdns_std: float = Field(gt=0)
    low_mean: float
    low_std: float = Field(gt=0)
    statistics: StatisticsSpec | None = None
    parts: list[LowLevelPart] = Field(default_factory=lambda: ["pixels"], min_length=1)  # type: ignore[arg-type]
    validation: dict[str, Any] = Field(default_factory=dict)  # AUROCs that chose the default

    @model_validator(mode="after")
    def _parts(self) -> LowLevelSpec:
        if "statistics" in self.parts and self.statistics is None:
            raise ValueError("the statistics part needs its statistics spec")
        return self

    def bank_dim(self, channels: int) -> int:
        """Columns of the low-level bank: pooled pixels, then the statistics."""
        n_stats = len(self.statistics.names) if self.statistics is not None else 0
        return self.side * self.side * channels + n_stats


class ScoreSpec(BaseModel):
    """Kernel score settings; k = None sums over every reference feature."""

    model_config = ConfigDict(extra="forbid")
    temperature: float = Field(0.04, gt=0)
    k: int | None = Field(200, ge=1)
    index_factory: str = "Flat"
    n_reference: int = 0
    k_selection: dict[str, Any] = Field(default_factory=dict)  # how k was chosen, if measured
    # For an approximate index (not Flat): recall and AUROC against exact search, measured on
    # validation images at fit time.
    index_quality: dict[str, float] = Field(default_factory=dict)
    lowlevel: LowLevelSpec | None = None  # None: the bundle has the SDNS score only
    default: Literal["sdns", "combined"] = "sdns"  # the score `auto` picks


HELD_OUT_RATES = (0.01, 0.02, 0.05, 0.1, 0.2)
MIN_EXPECTED_FLAGS = 20  # an alarm rate enters the ratio when it should flag this many images


class HeldOutCheck(BaseModel):
    """How often held-out reference images (in neither the bank nor the calibration set) are
    flagged at each alarm rate, against the calibration scores of one score. Exchangeable
    images are flagged at the alarm rate, up to the calibration set's finite-sample error; the
    ratio is what the camera test's margin must at least cover (sequential.py)."""

    model_config = ConfigDict(extra="forbid")
    n: int
    data: str = ""
    flag_rates: dict[str, float]  # alarm rate -> fraction of the held-out images flagged
    # The largest flag rate / alarm rate among the rates expected to flag MIN_EXPECTED_FLAGS
    # or more images (None when none does: too few held-out images to tell).
    ratio: float | None = None


def held_out_check(scores: np.ndarray, calibration: np.ndarray, data: str) -> HeldOutCheck:
    """The held-out `scores` against the `calibration` scores (flagged: p < alarm rate)."""
    return _check(p_values(np.asarray(scores, dtype=np.float64), np.sort(calibration)), data)


def cross_check(scores: np.ndarray, data: str, seed: int = 0) -> HeldOutCheck:
    """For a calibration set with nothing held out (recalibration): each random half against
    the other. The halves are half the size of the calibration set, so the check sees twice
    its finite-sample error at most: conservative."""
    order = np.random.default_rng(seed).permutation(len(scores))
    a, b = np.sort(scores[order[: len(order) // 2]]), np.sort(scores[order[len(order) // 2 :]])
    return _check(np.concatenate([p_values(b, a), p_values(a, b)]), f"{data} (halves crossed)")


def _check(p: np.ndarray, data: str) -> HeldOutCheck:
    rates = {a: float(np.mean(p < a)) if p.size else 0.0 for a in HELD_OUT_RATES}
    ratios = [r / a for a, r in rates.items() if a * p.size >= MIN_EXPECTED_FLAGS]
    return HeldOutCheck(
        n=int(p.size),
        data=data,
        flag_rates={str(a): r for a, r in rates.items()},
        ratio=max(ratios) if ratios else None,
    )


class CalibrationSummary(BaseModel):
    model_config = ConfigDict(extra="forbid")
    n: int
    quantiles: dict[str, float]
    default_alarm_rate: float = Field(0.01, gt=0, lt=1)
    data: str = ""
    # Per score ("sdns", "combined"): held-out reference images against its calibration.
    held_out: dict[str, HeldOutCheck] = Field(default_factory=dict)


class TrainingRecord(BaseModel):
    model_config = ConfigDict(extra="forbid")
    data: str = ""
    aux: list[str] = Field(default_factory=list)
    fingerprint: str = ""  # SHA-256 of the training images' bytes
    n_train: int = 0
    n_validation: int = 0
    config: dict[str, Any] = Field(default_factory=dict)
    curves: dict[str, list[float]] = Field(default_factory=dict)
    metrics: dict[str, Any] = Field(default_factory=dict)
    wall_seconds: float = 0.0


class Manifest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    format_version: int = FORMAT_VERSION
    name: str
    library_version: str = __version__
    created_at: str = Field(default_factory=lambda: datetime.now(UTC).isoformat(timespec="seconds"))
    backbone: BackboneConfig
    input: InputSpec
    feature_dim: int = Field(ge=1)
    score: ScoreSpec
    calibration: CalibrationSummary
    training: TrainingRecord = Field(default_factory=TrainingRecord)
    files: dict[str, str] = Field(default_factory=dict)


@dataclass(frozen=True)
class Bundle:
    """A loaded, verified bundle."""

    path: Path
    manifest: Manifest
    hash: str
    state_dict: dict[str, torch.Tensor]
    features: np.ndarray  # float32 N x D
    calibration: np.ndarray  # float64, sorted: calibration scores of the SDNS score
    lowlevel: np.ndarray | None = None  # float32 M x D_low, with the combined score
    calibration_combined: np.ndarray | None = None  # float64, sorted
    signed_by: str | None = None  # key id of a verified signature (sdns_monitor.signing)

    @property
    def name(self) -> str:
        return self.manifest.name


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def calibration_summary(
    scores: np.ndarray,
    alarm_rate: float,
    data: str,
    held_out: dict[str, HeldOutCheck] | None = None,
) -> CalibrationSummary:
    qs = (0.5, 0.9, 0.95, 0.99, 0.999)
    values = np.quantile(scores, qs) if scores.size else np.zeros(len(qs))
    return CalibrationSummary(
        n=int(scores.size),
        quantiles={str(q): float(v) for q, v in zip(qs, values, strict=True)},
        default_alarm_rate=alarm_rate,
        data=data,
        held_out=held_out or {},
    )


def write_bundle(
    path: Path,
    manifest: Manifest,
    encoder_state: dict[str, torch.Tensor],
    features: np.ndarray,
    calibration: np.ndarray,
    lowlevel: np.ndarray | None = None,
    calibration_combined: np.ndarray | None = None,
) -> Path:
    """Write a new bundle at `path` (which must not exist) and return it. `lowlevel` and
    `calibration_combined` come with `manifest.score.lowlevel` (the combined score)."""
    path = Path(path)
    if path.exists():
        raise BundleError(f"{path} already exists; bundles are immutable: choose another --out")
    if features.ndim != 2 or features.shape[1] != manifest.feature_dim:
        raise ValueError("features do not match the manifest's feature_dim")
    combined = manifest.score.lowlevel is not None
    if combined != (lowlevel is not None and calibration_combined is not None):
        raise ValueError("score.lowlevel, lowlevel and calibration_combined go together")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=path.parent))
    try:
        state = {k: v.detach().cpu().contiguous() for k, v in encoder_state.items()}
        save_file(state, str(tmp / ENCODER))
        np.save(tmp / FEATURES, np.ascontiguousarray(features, dtype=np.float32))
        np.save(tmp / CALIBRATION, np.sort(calibration.astype(np.float64)))
        names: tuple[str, ...] = REQUIRED_FILES
        if lowlevel is not None and calibration_combined is not None:
            np.save(tmp / LOWLEVEL, np.ascontiguousarray(lowlevel, dtype=np.float32))
            np.save(tmp / CALIBRATION_COMBINED, np.sort(calibration_combined.astype(np.float64)))
            names = REQUIRED_FILES + LOWLEVEL_FILES
        files = {name: sha256_file(tmp / name) for name in names}
        final = manifest.model_copy(update={"files": files})
        (tmp / MANIFEST).write_text(final.model_dump_json(indent=2) + "\n")
        # mkdtemp makes the directory owner-only; a bundle is read by services running as
        # other users, so give it the permissions a plain mkdir would have.
        umask = os.umask(0)
        os.umask(umask)
        tmp.chmod(0o777 & ~umask)
        os.replace(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return path


def read_manifest_bytes(path: Path) -> bytes:
    """The raw bytes of `path/manifest.json` (what the bundle hash and signatures cover)."""
    path = Path(path)
    mpath = path / MANIFEST
    if not path.is_dir():
        raise BundleError(
            f"no model bundle at {path}: expected a directory made by `sdns-monitor fit`"
        )
    if not mpath.is_file():
        raise BundleError(f"{path} is not a model bundle: {MANIFEST} is missing")
    return mpath.read_bytes()


def read_manifest(path: Path, raw: bytes | None = None) -> tuple[Manifest, str]:
    """Parse and validate `path/manifest.json` (or `raw`, its bytes already read); returns it
    and the bundle hash."""
    path = Path(path)
    mpath = path / MANIFEST
    if raw is None:
        raw = read_manifest_bytes(path)
    try:
        data = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise BundleError(f"{mpath} is not valid JSON ({exc}); the bundle is damaged") from None
    version = data.get("format_version") if isinstance(data, dict) else None
    if version != FORMAT_VERSION:
        raise BundleError(
            f"{path} has bundle format version {version!r}, this library reads version "
            f"{FORMAT_VERSION}; refit or use a matching sdns-monitor version"
        )
    try:
        manifest = Manifest.model_validate(data)
    except ValidationError as exc:
        where, what = first_problem(exc)
        raise BundleError(f"{mpath} is invalid at {where}: {what}") from None
    return manifest, hashlib.sha256(raw).hexdigest()


def verify_files(path: Path, manifest: Manifest) -> dict[str, bytes]:
    """Every required file is listed, present and has the hash the manifest records.

    Returns the verified bytes: callers parse these, never the files again, so nothing can
    change between the check and the use.
    """
    verified: dict[str, bytes] = {}
    required = REQUIRED_FILES + (LOWLEVEL_FILES if manifest.score.lowlevel else ())
    for name in required:
        if name not in manifest.files:
            raise BundleError(
                f"{path}: manifest lists no hash for {name}; the bundle is incomplete"
            )
    for name, expected in manifest.files.items():
        f = path / name
        if Path(name).name != name:
            raise BundleError(f"{path}: manifest names a file outside the bundle: {name!r}")
        if not f.is_file():
            raise BundleError(f"{path}: {name} is missing; the bundle is incomplete")
        data = f.read_bytes()
        if hashlib.sha256(data).hexdigest() != expected:
            raise BundleError(
                f"{path}: {name} does not match its SHA-256 in the manifest; the bundle was "
                "changed after it was written: refit or restore it"
            )
        verified[name] = data
    return verified


def load_bundle(
    path: str | Path, *, public_key: Path | None = None, require_signed: bool = False
) -> Bundle:
    """Read and verify a bundle. Raises BundleError on any problem, before weights are used.

    With `public_key`, the bundle must carry a signature that verifies with it
    (sdns_monitor.signing), checked before its manifest is even parsed: an unsigned bundle is
    refused. `require_signed` states that explicitly; it needs `public_key`.
    """
    from sdns_monitor.signing import check_signature

    path = Path(path)
    raw = read_manifest_bytes(path)
    signed_by = check_signature(path, raw, public_key, require_signed)
    manifest, digest = read_manifest(path, raw)
    files = verify_files(path, manifest)
    try:
        state = load_safetensors(files[ENCODER])
    except (SafetensorError, OSError, ValueError) as exc:
        raise BundleError(f"{path}: {ENCODER} is not a valid safetensors file ({exc})") from None
    try:
        features = np.load(io.BytesIO(files[FEATURES]), allow_pickle=False)
        calibration = np.load(io.BytesIO(files[CALIBRATION]), allow_pickle=False)
    except (ValueError, OSError) as exc:
        raise BundleError(f"{path}: cannot read arrays ({exc})") from None
    if (
        features.dtype != np.float32
        or features.ndim != 2
        or features.shape[1] != manifest.feature_dim
    ):
        raise BundleError(
            f"{path}: {FEATURES} has shape {features.shape} / {features.dtype}, "
            f"expected N x {manifest.feature_dim} float32"
        )
    if calibration.ndim != 1 or not np.issubdtype(calibration.dtype, np.floating):
        raise BundleError(f"{path}: {CALIBRATION} must be a one-dimensional float array")
    lowlevel = calibration_combined = None
    low = manifest.score.lowlevel
    if low is not None:
        try:
            lowlevel = np.load(io.BytesIO(files[LOWLEVEL]), allow_pickle=False)
            calibration_combined = np.load(
                io.BytesIO(files[CALIBRATION_COMBINED]), allow_pickle=False
            )
        except (ValueError, OSError) as exc:
            raise BundleError(f"{path}: cannot read arrays ({exc})") from None
        dim = low.bank_dim(manifest.input.channels)
        if lowlevel.dtype != np.float32 or lowlevel.ndim != 2 or lowlevel.shape[1] != dim:
            raise BundleError(
                f"{path}: {LOWLEVEL} has shape {lowlevel.shape} / {lowlevel.dtype}, "
                f"expected M x {dim} float32"
            )
        if calibration_combined.ndim != 1 or not np.issubdtype(
            calibration_combined.dtype, np.floating
        ):
            raise BundleError(f"{path}: {CALIBRATION_COMBINED} must be a one-dimensional array")
        calibration_combined = np.sort(calibration_combined.astype(np.float64))
    return Bundle(
        path,
        manifest,
        digest,
        state,
        features,
        np.sort(calibration.astype(np.float64)),
        lowlevel,
        calibration_combined,
        signed_by,
    )
