"""`fit`: reference data in, model bundle out.

1. Load the reference data; split it into training images (encoder training and the reference
   bank), validation images (carved from training, held out of the bank, for choosing k) and
   calibration images (held out of both; their scores give the p-values).
2. Train the SDNS encoder (trainer.loop).
3. Teacher features of the training split form the bank; choose k on validation data;
   build the low-level bank of the combined score, standardise both scores on validation
   images and pick the default score by validation AUROC; score the calibration images;
   write the bundle.
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

from sdns_monitor.backbones import BackboneConfig
from sdns_monitor.bundle import (
    InputSpec,
    LowLevelSpec,
    Manifest,
    ScoreSpec,
    TrainingRecord,
    calibration_summary,
    write_bundle,
)
from sdns_monitor.data import ImageSet, load_dataset, parse_spec
from sdns_monitor.device import resolve_device
from sdns_monitor.errors import BundleError, DataError
from sdns_monitor.evaluation import ood_metrics
from sdns_monitor.features import extract_features
from sdns_monitor.index import ReferenceIndex, anomaly_scores, approximation_quality
from sdns_monitor.lowlevel import DEFAULT_K, combine, lowlevel_features, pooled_side
from sdns_monitor.preprocess import prepare_uint8
from sdns_monitor.scoring import cannot_flag
from trainer.config import TrainConfig
from trainer.loop import Trainer, dist_info
from trainer.negatives import shift

# Candidate k for the top-k kernel score, compared with k = all on validation data.
K_CANDIDATES = (10, 50, 200, 1000)
# The smallest k whose validation AUROC is within this of k = all becomes the default.
K_TOLERANCE = 0.002
# Shifts that make the synthetic out-of-distribution validation set used to choose k.
VALIDATION_SHIFTS = ("rot", "perm4", "pixperm", "perm16")


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


def shifted_validation(images: np.ndarray, seed: int, exclude: str | None = None) -> np.ndarray:
    """Synthetic out-of-distribution images: validation images under shifting transformations.

    `exclude` leaves out the shift the encoder was trained to reject, which would flatter it.
    """
    x = torch.from_numpy(images).permute(0, 3, 1, 2).float()
    gen = torch.Generator().manual_seed(seed)
    parts = [shift(x, kind, gen) for kind in VALIDATION_SHIFTS if kind != exclude]
    out = torch.cat(parts).round().clamp(0, 255).byte().permute(0, 2, 3, 1)
    return out.numpy()


def choose_k(
    index: ReferenceIndex, id_feats: torch.Tensor, ood_feats: torch.Tensor, temperature: float
) -> tuple[int | None, dict[str, Any]]:
    """The smallest candidate k whose validation AUROC (ID vs shifted ID) is within
    K_TOLERANCE of the exact k = all score (METHOD.md: top-k may not keep the ranking)."""
    exact = ood_metrics(
        anomaly_scores(index, id_feats, None, temperature),
        anomaly_scores(index, ood_feats, None, temperature),
    ).auroc
    record: dict[str, Any] = {"auroc_all": exact, "tolerance": K_TOLERANCE, "auroc_by_k": {}}
    chosen: int | None = None
    for k in K_CANDIDATES:
        if k >= len(index):
            break
        auroc = ood_metrics(
            anomaly_scores(index, id_feats, k, temperature),
            anomaly_scores(index, ood_feats, k, temperature),
        ).auroc
        record["auroc_by_k"][str(k)] = auroc
        if chosen is None and auroc >= exact - K_TOLERANCE:
            chosen = k
    record["chosen"] = chosen
    record["method"] = (
        "validation images vs the same images under shifts other than the training negatives"
    )
    return chosen, record


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
    if out.exists() and info.is_main:
        raise BundleError(f"{out} already exists; bundles are immutable: choose another --out")
    parent = out.parent if str(out.parent) else Path(".")
    parent.mkdir(parents=True, exist_ok=True)
    if not os.access(parent, os.W_OK):
        raise BundleError(f"cannot write to {parent}; choose an --out in a writable directory")
    dev = resolve_device(device)
    if dev.type == "cuda" and info.world_size > 1:
        dev = torch.device("cuda", info.local_rank)
        torch.cuda.set_device(dev)
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // info.world_size))

    reference = load_reference(data, cfg.data_size)
    cfg = cfg.with_sizes(max(reference.images.shape[1:3]))
    size, _, _ = cfg.sizes
    channels: Literal[1, 3] = 1 if reference.images.shape[-1] == 1 else 3
    images = prepare_uint8(reference.images, size, channels)
    reference = ImageSet(images, reference.labels, reference.sources, reference.spec)
    splits = split_reference(reference, cfg)
    train_images = splits.train.images
    mean = (train_images.reshape(-1, channels).mean(0) / 255.0).tolist()
    std = np.maximum(train_images.reshape(-1, channels).std(0) / 255.0, 1e-3).tolist()
    aux = load_aux(cfg.aux, size, channels) if cfg.uses_aux else None
    log(
        f"data {data}: {len(splits.train)} training, {len(splits.validation)} validation, "
        f"{len(splits.calibration)} calibration images at {size} px, {channels} channel(s)"
        + (f"; {len(aux)} auxiliary images from {', '.join(cfg.aux)}" if aux is not None else "")
    )

    backbone_cfg = BackboneConfig(
        name=cfg.backbone,
        in_channels=channels,
        image_size=cfg.sizes[1],
        patch_size=cfg.patch_size,
        width=cfg.width,
        drop_path=cfg.drop_path,
    )
    trainer = Trainer(
        cfg,
        backbone_cfg,
        torch.from_numpy(train_images),
        None if aux is None else torch.from_numpy(aux),
        mean,
        std,
        dev,
        checkpoint_dir=out.with_name(out.name + ".ckpt"),
        progress=progress,
    )
    if resume and trainer.resume():
        log(f"resumed from epoch {trainer.start_epoch} of {cfg.epochs}")
    t0 = time.perf_counter()
    result = trainer.fit()
    train_seconds = time.perf_counter() - t0
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()  # the rest runs on rank 0 alone
    if not info.is_main:
        return None

    spec = InputSpec(size=size, model_size=cfg.sizes[1], channels=channels, mean=mean, std=std)
    teacher = result.teacher
    bank_images = train_images
    if cfg.bank_size is not None and cfg.bank_size < len(bank_images):
        pick = np.random.default_rng(cfg.seed + 1).choice(
            len(bank_images), cfg.bank_size, replace=False
        )
        bank_images = bank_images[np.sort(pick)]
    bank = extract_features(teacher, bank_images, spec, dev).numpy()
    index = ReferenceIndex(bank, cfg.index_factory, dev)

    k: int | None = None if cfg.score_k in (None, "all") else int(cfg.score_k)
    k_record: dict[str, Any] = {"chosen": k, "method": "set by the recipe or --k"}
    val_auroc = None
    val_id = val_ood = None
    val_shifted = None
    if len(splits.validation) >= 20:
        val_shifted = shifted_validation(splits.validation.images, cfg.seed, exclude=cfg.negatives)
        val_id = extract_features(teacher, splits.validation.images, spec, dev)
        val_ood = extract_features(teacher, val_shifted, spec, dev)
        chosen, measured = choose_k(index, val_id, val_ood, cfg.score_temperature)
        if cfg.score_k is None:
            k, k_record = chosen, measured
        else:
            k_record["measured"] = measured
        val_auroc = measured["auroc_all"]
    cal_feats = extract_features(teacher, splits.calibration.images, spec, dev)
    cal_scores = anomaly_scores(index, cal_feats, k, cfg.score_temperature)
    index_quality: dict[str, float] = {}
    if cfg.index_factory != "Flat" and val_id is not None and val_ood is not None:
        index_quality = approximation_quality(index, val_id, val_ood, k, cfg.score_temperature)
        log(
            f"{cfg.index_factory} against exact search on validation images: recall "
            f"{next(iter(index_quality.values())):.3f}, AUROC change "
            f"{index_quality['auroc_change']:+.4f}"
        )

    low_spec = low_bank = cal_combined = None
    if cfg.lowlevel and val_id is not None and val_ood is not None and val_shifted is not None:
        sdns_val = (
            anomaly_scores(index, val_id, k, cfg.score_temperature),
            anomaly_scores(index, val_ood, k, cfg.score_temperature),
        )
        low_spec, low_bank = build_lowlevel(
            train_images, splits.validation.images, val_shifted, sdns_val, cfg, dev
        )
        low_index = ReferenceIndex(low_bank, "Flat", dev)
        cal_low = anomaly_scores(
            low_index,
            lowlevel_features(splits.calibration.images, low_spec.side),
            low_spec.k,
            low_spec.temperature,
        )
        cal_combined = combine(cal_scores, cal_low, low_spec.stats)
        v = low_spec.validation
        log(
            f"validation AUROC vs shifted images: sdns {v['auroc_sdns']:.3f}, low-level "
            f"{v['auroc_low']:.3f}, combined {v['auroc_combined']:.3f}; default score "
            f"{v['default']}"
        )

    wall = time.perf_counter() - started
    if (problem := cannot_flag(len(cal_scores), cfg.alarm_rate)) is not None:
        log(f"warning: {problem}")
    manifest = Manifest(
        name=out.name.removesuffix(".sdns"),
        backbone=backbone_cfg.model_copy(update={"drop_path": 0.0}),
        input=spec,
        feature_dim=teacher.feature_dim,
        score=ScoreSpec(
            temperature=cfg.score_temperature,
            k=k,
            index_factory=cfg.index_factory,
            n_reference=len(bank),
            k_selection=k_record,
            index_quality=index_quality,
            lowlevel=low_spec,
            default=low_spec.validation["default"] if low_spec else "sdns",
        ),
        calibration=calibration_summary(cal_scores, cfg.alarm_rate, f"{data} (held-out split)"),
        training=TrainingRecord(
            data=data,
            aux=cfg.aux if cfg.uses_aux else [],
            fingerprint=fingerprint(train_images),
            n_train=len(splits.train),
            n_validation=len(splits.validation),
            config=cfg.model_dump(mode="json"),
            curves=result.history.as_dict(),
            metrics={
                "validation_shifted_auroc": val_auroc,
                "images_per_second": result.images_per_second,
                "train_seconds": train_seconds,
                "device": str(dev),
                "processes": info.world_size,
            },
            wall_seconds=wall,
        ),
    )
    write_bundle(out, manifest, teacher.state_dict(), bank, cal_scores, low_bank, cal_combined)
    shutil.rmtree(out.with_name(out.name + ".ckpt"), ignore_errors=True)
    return FitReport(
        out,
        time.perf_counter() - started,
        train_seconds,
        result.images_per_second,
        k,
        val_auroc,
        manifest.score.default,
        low_spec.validation["auroc_combined"] if low_spec else None,
    )


def build_lowlevel(
    train_images: np.ndarray,
    val_images: np.ndarray,
    val_shifted: np.ndarray,
    sdns_val: tuple[np.ndarray, np.ndarray],
    cfg: TrainConfig,
    device: torch.device,
) -> tuple[LowLevelSpec, np.ndarray]:
    """The low-level bank and the standardisation of the combined score, both from training
    data: the bank from training images, the statistics from validation images (in neither
    bank). The default score is the one with the higher validation AUROC, ID validation
    images against the same images shifted (`sdns_val` holds the SDNS scores of both)."""
    side = pooled_side(train_images.shape[1], train_images.shape[-1])
    images = train_images
    if len(images) > cfg.lowlevel_bank:
        pick = np.random.default_rng(cfg.seed + 2).choice(len(images), cfg.lowlevel_bank, False)
        images = images[np.sort(pick)]
    bank = lowlevel_features(images, side).numpy()
    index = ReferenceIndex(bank, "Flat", device)
    k = min(DEFAULT_K, len(bank))
    t = cfg.score_temperature
    low_id = anomaly_scores(index, lowlevel_features(val_images, side), k, t)
    low_ood = anomaly_scores(index, lowlevel_features(val_shifted, side), k, t)
    sdns_id, sdns_ood = sdns_val
    stats = (
        float(sdns_id.mean()),
        float(max(sdns_id.std(), 1e-6)),
        float(low_id.mean()),
        float(max(low_id.std(), 1e-6)),
    )
    aurocs = {
        "auroc_sdns": ood_metrics(sdns_id, sdns_ood).auroc,
        "auroc_low": ood_metrics(low_id, low_ood).auroc,
        "auroc_combined": ood_metrics(
            combine(sdns_id, low_id, stats), combine(sdns_ood, low_ood, stats)
        ).auroc,
    }
    default = "combined" if aurocs["auroc_combined"] > aurocs["auroc_sdns"] else "sdns"
    spec = LowLevelSpec(
        side=side,
        temperature=t,
        k=k,
        n_reference=len(bank),
        sdns_mean=stats[0],
        sdns_std=stats[1],
        low_mean=stats[2],
        low_std=stats[3],
        validation={
            **aurocs,
            "default": default,
            "method": "validation images vs the same images under shifts other than the "
            "training negatives; the higher AUROC of sdns and combined is the default",
        },
    )
    return spec, bank
