"""`fit`: reference data in, model bundle out.

`fit` reads as its stages, in order:

1. `check_output`, `setup_device`: the bundle path is new and writable; the device of this
   process (one GPU per rank under torchrun).
2. `prepare_data`: load the reference data; split it into training images (encoder training and
   the reference bank), validation images (carved from training, held out of the bank, for
   choosing the score) and calibration images (held out of both; their scores give the
   p-values); the normalisation and the auxiliary images.
3. `train_encoder`: train the SDNS encoder (trainer.loop), on every rank; rank 0 goes on alone.
4. `build_reference_bank`: teacher features of the training split form the bank and its index.
5. `select_score` (trainer.selection): choose k on validation data, measure an approximate
   index against exact search, build the low-level bank of the combined score, standardise
   both scores on validation images and pick the default score by validation AUROC.
6. `calibrate`: score the calibration images with each score (too few to flag anything at
   the alarm rate: a warning).
7. `build_manifest`, `save_bundle`: what the bundle records, and the bundle itself (the
   training checkpoints go once it is written).
"""

from __future__ import annotations

import hashlib
import os
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch

from sdns_monitor.bundle import (
    HeldOutCheck,
    InputSpec,
    Manifest,
    ScoreSpec,
    TrainingRecord,
    calibration_summary,
    held_out_check,
    write_bundle,
)
from sdns_monitor.data import ImageSet, load_dataset, parse_spec
from sdns_monitor.device import resolve_device
from sdns_monitor.errors import BundleError, DataError
from sdns_monitor.features import extract_features
from sdns_monitor.index import ReferenceIndex
from sdns_monitor.lowlevel import LowLevelScorer
from sdns_monitor.networks import BackboneConfig
from sdns_monitor.preprocess import prepare_uint8
from sdns_monitor.scoring import cannot_flag
from trainer.config import TrainConfig
from trainer.loop import DistInfo, Trainer, TrainResult, dist_info
from trainer.selection import ScoreSelection, select_score


@dataclass(frozen=True)
class Splits:
    train: ImageSet
    validation: ImageSet
    calibration: ImageSet


@dataclass(frozen=True)
class FitReport:
    bundle: Path
    wall_seconds: float
    train_seconds: float
    images_per_second: float
    k: int | None
    validation_auroc: float | None
    score_default: str = "sdns"
    validation_auroc_combined: float | None = None


@dataclass(frozen=True)
class PreparedData:
    """The reference data as training sees it: split, at the training size and channels."""

    splits: Splits
    input: InputSpec  # size, channels and the training images' mean and std
    aux: np.ndarray | None  # auxiliary images for the negatives, when the recipe uses them


@dataclass(frozen=True)
class TrainedEncoder:
    result: TrainResult  # the teacher is the encoder that ships
    backbone: BackboneConfig
    seconds: float  # training alone


@dataclass(frozen=True)
class Calibration:
    """Scores of the held-out calibration images; `combined` with the combined score only;
    `held_out`: the validation images checked against them, per score."""

    scores: np.ndarray
    combined: np.ndarray | None
    held_out: dict[str, HeldOutCheck]


def fit(
    data: str,
    out: Path,
    cfg: TrainConfig,
    *,
    device: str = "auto",
    resume: bool = False,
    progress: Callable[[dict[str, Any]], None] | None = None,
    log: Callable[[str], None] = print,
) -> FitReport | None:
    """Train on `data` and write the bundle `out`. Returns None on non-main ranks."""
    started = time.perf_counter()
    out = Path(out)
    info = dist_info()
    check_output(out, info)
    dev = setup_device(device, info)
    cfg, prepared = prepare_data(data, cfg, log)
    trained = train_encoder(prepared, cfg, dev, out, resume=resume, progress=progress, log=log)
    if not info.is_main:
        return None
    teacher = trained.result.teacher
    bank, index = build_reference_bank(teacher, prepared, cfg, dev)
    splits = prepared.splits
    selection = select_score(
        teacher, index, splits.train.images, splits.validation.images, prepared.input, cfg, dev, log
    )
    calibration = calibrate(teacher, index, selection, prepared, cfg, dev, log)
    manifest = build_manifest(
        out.name.removesuffix(".sdns"),
        data,
        cfg,
        prepared,
        trained,
        len(bank),
        selection,
        calibration,
        device=dev,
        processes=info.world_size,
        wall_seconds=time.perf_counter() - started,
    )
    save_bundle(out, manifest, teacher, bank, selection, calibration)
    return FitReport(
        bundle=out,
        wall_seconds=time.perf_counter() - started,
        train_seconds=trained.seconds,
        images_per_second=trained.result.images_per_second,
        k=selection.k,
        validation_auroc=selection.validation_auroc,
        score_default=manifest.score.default,
        validation_auroc_combined=selection.validation_auroc_combined,
    )


def checkpoint_dir(out: Path) -> Path:
    """Where training checkpoints go, beside the bundle; removed once the bundle is written."""
    return out.with_name(out.name + ".ckpt")


def check_output(out: Path, info: DistInfo) -> None:
    """BundleError unless `out` is new (checked on the main rank, the one that writes it) and
    its directory writable (made if missing)."""
    if out.exists() and info.is_main:
        raise BundleError(f"{out} already exists; bundles are immutable: choose another --out")
    parent = out.parent if str(out.parent) else Path(".")
    parent.mkdir(parents=True, exist_ok=True)
    if not os.access(parent, os.W_OK):
        raise BundleError(f"cannot write to {parent}; choose an --out in a writable directory")


def setup_device(device: str, info: DistInfo) -> torch.device:
    """The device of this process (its own GPU under torchrun) and its share of CPU threads."""
    dev = resolve_device(device)
    if dev.type == "cuda" and info.world_size > 1:
        dev = torch.device("cuda", info.local_rank)
        torch.cuda.set_device(dev)
    torch.set_num_threads(max(1, usable_cpus() // info.world_size))
    return dev


def usable_cpus() -> int:
    """The CPUs this process may run on (its affinity mask: a container's share, not the
    host's count)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def prepare_data(
    data: str, cfg: TrainConfig, log: Callable[[str], None]
) -> tuple[TrainConfig, PreparedData]:
    """The reference data at the training size, split, with its normalisation and the
    auxiliary images; and `cfg` with its sizes filled from the data."""
    reference = load_reference(data, cfg.data_size)
    cfg = cfg.with_sizes(max(reference.images.shape[1:3]))
    size, model_size, _ = cfg.sizes
    channels: Literal[1, 3] = 1 if reference.images.shape[-1] == 1 else 3
    images = prepare_uint8(reference.images, size, channels)
    reference = ImageSet(images, reference.labels, reference.sources, reference.spec)
    splits = split_reference(reference, cfg)
    cfg = cfg.with_steps(len(splits.train))
    train_images = splits.train.images
    mean = (train_images.reshape(-1, channels).mean(0) / 255.0).tolist()
    std = np.maximum(train_images.reshape(-1, channels).std(0) / 255.0, 1e-3).tolist()
    aux = load_aux(cfg.aux, size, channels) if cfg.uses_aux else None
    log(
        f"data {data}: {len(splits.train)} training, {len(splits.validation)} validation, "
        f"{len(splits.calibration)} calibration images at {size} px, {channels} channel(s)"
        + (f"; {len(aux)} auxiliary images from {', '.join(cfg.aux)}" if aux is not None else "")
    )
    spec = InputSpec(size=size, model_size=model_size, channels=channels, mean=mean, std=std)
    return cfg, PreparedData(splits, spec, aux)


def train_encoder(
    prepared: PreparedData,
    cfg: TrainConfig,
    device: torch.device,
    out: Path,
    *,
    resume: bool,
    progress: Callable[[dict[str, Any]], None] | None,
    log: Callable[[str], None],
) -> TrainedEncoder:
    """Train the encoder on the training split, from the last checkpoint with `resume`. Every
    rank trains; the process group ends here."""
    spec = prepared.input
    backbone = BackboneConfig(
        name=cfg.backbone,
        in_channels=spec.channels,
        image_size=spec.model_size,
        patch_size=cfg.patch_size,
        width=cfg.width,
        drop_path=cfg.drop_path,
    )
    trainer = Trainer(
        cfg,
        backbone,
        torch.from_numpy(prepared.splits.train.images),
        None if prepared.aux is None else torch.from_numpy(prepared.aux),
        spec.mean,
        spec.std,
        device,
        checkpoint_dir=checkpoint_dir(out),
        progress=progress,
    )
    p = trainer.precision
    measured = p.get("seconds_per_step")
    log(
        f"precision {p['chosen']} ({p['method']}"
        + (f"; s/step fp32 {measured['fp32']:.3f}, bf16 {measured['bf16']:.3f}" if measured else "")
        + f"); {trainer.total_steps} optimiser steps"
    )
    if resume and trainer.resume():
        log(f"resumed from epoch {trainer.start_epoch} of {cfg.epochs}")
    t0 = time.perf_counter()
    result = trainer.fit()
    seconds = time.perf_counter() - t0
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()  # the rest runs on rank 0 alone
    return TrainedEncoder(result, backbone, seconds)


def build_reference_bank(
    teacher: torch.nn.Module, prepared: PreparedData, cfg: TrainConfig, device: torch.device
) -> tuple[np.ndarray, ReferenceIndex]:
    """Teacher features of the training images (a seeded subset of `bank_size` when set), and
    their index."""
    images = prepared.splits.train.images
    if cfg.bank_size is not None and cfg.bank_size < len(images):
        pick = np.random.default_rng(cfg.seed + 1).choice(len(images), cfg.bank_size, replace=False)
        images = images[np.sort(pick)]
    bank = extract_features(teacher, images, prepared.input, device).numpy()
    return bank, ReferenceIndex(bank, cfg.index_factory, device)


def calibrate(
    teacher: torch.nn.Module,
    index: ReferenceIndex,
    selection: ScoreSelection,
    prepared: PreparedData,
    cfg: TrainConfig,
    device: torch.device,
    log: Callable[[str], None],
) -> Calibration:
    """Scores of the calibration images with the SDNS score and, when the bundle has it, the
    combined score; warns when there are too few to flag anything at the alarm rate. The
    validation images (in neither the bank nor the calibration) are checked against them: how
    often each alarm rate flags them (the camera test's margin, sequential.py)."""
    low, low_bank = selection.lowlevel, selection.lowlevel_bank
    lowlevel = None if low is None or low_bank is None else LowLevelScorer(low, low_bank, device)

    def scores_of(images: np.ndarray) -> dict[str, np.ndarray]:
        features = extract_features(teacher, images, prepared.input, device)
        out = {"sdns": index.kernel_scores(features, selection.k, cfg.score_temperature)}
        if lowlevel is not None:
            out["combined"] = lowlevel.combined(out["sdns"], images)
        return out

    calibration = scores_of(prepared.splits.calibration.images)
    held_out: dict[str, HeldOutCheck] = {}
    if len(prepared.splits.validation):
        validation = scores_of(prepared.splits.validation.images)
        held_out = {
            name: held_out_check(validation[name], calibration[name], "validation split")
            for name in calibration
        }
        check = held_out[selection.default]
        log(
            f"held-out check: {check.n} validation images flagged at "
            + ", ".join(f"{float(r):.2%} for {float(a):g}" for a, r in check.flag_rates.items())
        )
    if (problem := cannot_flag(len(calibration["sdns"]), cfg.alarm_rate)) is not None:
        log(f"warning: {problem}")
    return Calibration(calibration["sdns"], calibration.get("combined"), held_out)


def build_manifest(
    name: str,
    data: str,
    cfg: TrainConfig,
    prepared: PreparedData,
    trained: TrainedEncoder,
    n_reference: int,
    selection: ScoreSelection,
    calibration: Calibration,
    *,
    device: torch.device,
    processes: int,
    wall_seconds: float,
) -> Manifest:
    """What the bundle records: the encoder, its input, the score settings, the calibration
    summary and how it was trained (on `device`, by `processes` torchrun processes)."""
    return Manifest(
        name=name,
        backbone=trained.backbone.model_copy(update={"drop_path": 0.0}),
        input=prepared.input,
        feature_dim=trained.result.teacher.feature_dim,
        score=ScoreSpec(
            temperature=cfg.score_temperature,
            k=selection.k,
            index_factory=cfg.index_factory,
            n_reference=n_reference,
            k_selection=selection.k_record,
            index_quality=selection.index_quality,
            lowlevel=selection.lowlevel,
            default=selection.default,
        ),
        calibration=calibration_summary(
            calibration.scores, cfg.alarm_rate, f"{data} (held-out split)", calibration.held_out
        ),
        training=TrainingRecord(
            data=data,
            aux=cfg.aux if cfg.uses_aux else [],
            fingerprint=fingerprint(prepared.splits.train.images),
            n_train=len(prepared.splits.train),
            n_validation=len(prepared.splits.validation),
            config=cfg.model_dump(mode="json"),
            curves=trained.result.history.as_dict(),
            metrics={
                "validation_shifted_auroc": selection.validation_auroc,
                "images_per_second": trained.result.images_per_second,
                "train_seconds": trained.seconds,
                "precision": trained.result.precision,
                "device": str(device),
                "processes": processes,
            },
            wall_seconds=wall_seconds,
        ),
    )


def save_bundle(
    out: Path,
    manifest: Manifest,
    teacher: torch.nn.Module,
    bank: np.ndarray,
    selection: ScoreSelection,
    calibration: Calibration,
) -> None:
    """Write the bundle, then remove the training checkpoints it no longer needs."""
    write_bundle(
        out,
        manifest,
        teacher.state_dict(),
        bank,
        calibration.scores,
        selection.lowlevel_bank,
        calibration.combined,
    )
    shutil.rmtree(checkpoint_dir(out), ignore_errors=True)


def split_reference(data: ImageSet, cfg: TrainConfig) -> Splits:
    """Seeded random split into training, validation and calibration images."""
    n = len(data)
    order = np.random.default_rng(cfg.seed).permutation(n)
    n_cal = min(cfg.max_calibration, max(1, round(cfg.calibration_fraction * n)))
    n_val = round(cfg.validation_fraction * (n - n_cal))
    if n - n_cal - n_val < cfg.batch_size:
        raise DataError(
            f"{data.spec}: {n} images leave fewer than one training batch ({cfg.batch_size}) "
            "after calibration and validation splits; give more reference images"
        )
    cal, val, train = order[:n_cal], order[n_cal : n_cal + n_val], order[n_cal + n_val :]
    return Splits(data.subset(np.sort(train)), data.subset(np.sort(val)), data.subset(np.sort(cal)))


def load_reference(spec: str, size: int | None) -> ImageSet:
    """Reference images at `size`; None keeps the native size of fixed-size data sets (fit
    then squashes non-square ones to their longer side), and image folders default to 32 px
    (their files may differ in size)."""
    if size is None and parse_spec(spec).name == "folder":
        size = 32
    return load_dataset(spec, size=size)


def fingerprint(images: np.ndarray) -> str:
    h = hashlib.sha256()
    h.update(str(images.shape).encode())
    h.update(np.ascontiguousarray(images).tobytes())
    return h.hexdigest()


def load_aux(specs: list[str], size: int, channels: int) -> np.ndarray:
    """Auxiliary images, resized to the in-distribution size so they share its low-level
    statistics (METHOD.md "Views")."""
    parts = [prepare_uint8(load_dataset(s, size=size).images, size, channels) for s in specs]
    return np.concatenate(parts)
