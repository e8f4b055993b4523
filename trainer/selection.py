"""Choosing the score on validation images, after training (a stage of `trainer.fit`).

Validation images were carved from the training split and kept out of the reference bank; the
same images under shifting transformations stand in for out-of-distribution data. On them fit

1. chooses k, the number of nearest reference features the kernel score sums over (`choose_k`;
   `--k` or the recipe can fix it instead),
2. measures an approximate index against exact search (`approximation_quality`),
3. builds the low-level half of the combined score, standardises both halves and makes the one
   with the higher AUROC, sdns or combined, the bundle's default (`build_lowlevel`).

`select_score` runs the three and returns a `ScoreSelection`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import torch

from sdns_monitor.bundle import InputSpec, LowLevelSpec
from sdns_monitor.evaluation import ood_metrics
from sdns_monitor.features import extract_features
from sdns_monitor.index import ReferenceIndex, approximation_quality
from sdns_monitor.lowlevel import DEFAULT_K, lowlevel_features, pooled_side
from sdns_monitor.scoring import combined_score
from trainer.config import TrainConfig
from trainer.negatives import shift

# Candidate k for the top-k kernel score, compared with k = all on validation data.
K_CANDIDATES = (10, 50, 200, 1000)
# The smallest k whose validation AUROC is within this of k = all becomes the default.
K_TOLERANCE = 0.002
# Shifts that make the synthetic out-of-distribution validation set used to choose k.
VALIDATION_SHIFTS = ("rot", "perm4", "pixperm", "perm16")
# Fewer validation images than this measure nothing: k stays as configured, no combined score.
MIN_VALIDATION = 20


@dataclass(frozen=True)
class ValidationSet:
    """Validation images, the same images shifted (synthetic out-of-distribution data), and the
    teacher's features of both."""

    images: np.ndarray
    shifted: np.ndarray
    id_features: torch.Tensor
    ood_features: torch.Tensor


@dataclass(frozen=True)
class ScoreSelection:
    """What the validation images decided, as the bundle records it."""

    k: int | None  # None: the kernel score sums over every reference feature
    k_record: dict[str, Any]  # how k was set, and what validation measured (ScoreSpec)
    validation_auroc: float | None  # SDNS score with k = all; None without validation
    index_quality: dict[str, float]  # empty for exact search or without validation
    lowlevel: LowLevelSpec | None  # None: the bundle has the SDNS score only
    lowlevel_bank: np.ndarray | None

    @property
    def default(self) -> Literal["sdns", "combined"]:
        """The score `auto` picks."""
        return self.lowlevel.validation["default"] if self.lowlevel is not None else "sdns"

    @property
    def validation_auroc_combined(self) -> float | None:
        return self.lowlevel.validation["auroc_combined"] if self.lowlevel is not None else None


def select_score(
    teacher: torch.nn.Module,
    index: ReferenceIndex,
    train_images: np.ndarray,
    validation_images: np.ndarray,
    spec: InputSpec,
    cfg: TrainConfig,
    device: torch.device,
    log: Callable[[str], None],
) -> ScoreSelection:
    """Choose k, measure the index and build the combined score on validation images (see the
    module docstring); `index` holds the reference bank of the training images."""
    validation = validation_set(teacher, validation_images, spec, cfg, device)
    k, k_record, validation_auroc = resolve_k(index, validation, cfg)
    index_quality = measure_index_quality(index, validation, k, cfg, log)
    lowlevel, lowlevel_bank = build_combined_score(
        train_images, validation, index, k, cfg, device, log
    )
    return ScoreSelection(k, k_record, validation_auroc, index_quality, lowlevel, lowlevel_bank)


def validation_set(
    teacher: torch.nn.Module,
    images: np.ndarray,
    spec: InputSpec,
    cfg: TrainConfig,
    device: torch.device,
) -> ValidationSet | None:
    """The validation images, shifted, and the features of both; None when there are too few."""
    if len(images) < MIN_VALIDATION:
        return None
    shifted = shifted_validation(images, cfg.seed, exclude=cfg.negatives)
    return ValidationSet(
        images,
        shifted,
        extract_features(teacher, images, spec, device),
        extract_features(teacher, shifted, spec, device),
    )


def resolve_k(
    index: ReferenceIndex, validation: ValidationSet | None, cfg: TrainConfig
) -> tuple[int | None, dict[str, Any], float | None]:
    """k, the record of how it was set, and the validation AUROC at k = all. `--k` or the
    recipe's k wins (validation's measurement is still recorded); else `choose_k` decides."""
    k: int | None = None if cfg.score_k in (None, "all") else int(cfg.score_k)
    record: dict[str, Any] = {"chosen": k, "method": "set by the recipe or --k"}
    if validation is None:
        return k, record, None
    chosen, measured = choose_k(
        index, validation.id_features, validation.ood_features, cfg.score_temperature
    )
    if cfg.score_k is None:
        k, record = chosen, measured
    else:
        record["measured"] = measured
    return k, record, measured["auroc_all"]


def measure_index_quality(
    index: ReferenceIndex,
    validation: ValidationSet | None,
    k: int | None,
    cfg: TrainConfig,
    log: Callable[[str], None],
) -> dict[str, float]:
    """Recall and AUROC change of an approximate index against exact search on validation
    images; empty for exact search (Flat) or without validation images."""
    if cfg.index_factory == "Flat" or validation is None:
        return {}
    quality = approximation_quality(
        index, validation.id_features, validation.ood_features, k, cfg.score_temperature
    )
    log(
        f"{cfg.index_factory} against exact search on validation images: recall "
        f"{next(iter(quality.values())):.3f}, AUROC change "
        f"{quality['auroc_change']:+.4f}"
    )
    return quality


def build_combined_score(
    train_images: np.ndarray,
    validation: ValidationSet | None,
    index: ReferenceIndex,
    k: int | None,
    cfg: TrainConfig,
    device: torch.device,
    log: Callable[[str], None],
) -> tuple[LowLevelSpec | None, np.ndarray | None]:
    """The low-level spec and bank of the combined score (`build_lowlevel`), or (None, None)
    when the recipe turns it off or there are no validation images to standardise it on."""
    if not cfg.lowlevel or validation is None:
        return None, None
    sdns_val = (
        index.kernel_scores(validation.id_features, k, cfg.score_temperature),
        index.kernel_scores(validation.ood_features, k, cfg.score_temperature),
    )
    spec, bank = build_lowlevel(
        train_images, validation.images, validation.shifted, sdns_val, cfg, device
    )
    v = spec.validation
    log(
        f"validation AUROC vs shifted images: sdns {v['auroc_sdns']:.3f}, low-level "
        f"{v['auroc_low']:.3f}, combined {v['auroc_combined']:.3f}; default score "
        f"{v['default']}"
    )
    return spec, bank


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
        index.kernel_scores(id_feats, None, temperature),
        index.kernel_scores(ood_feats, None, temperature),
    ).auroc
    record: dict[str, Any] = {"auroc_all": exact, "tolerance": K_TOLERANCE, "auroc_by_k": {}}
    chosen: int | None = None
    for k in K_CANDIDATES:
        if k >= len(index):
            break
        auroc = ood_metrics(
            index.kernel_scores(id_feats, k, temperature),
            index.kernel_scores(ood_feats, k, temperature),
        ).auroc
        record["auroc_by_k"][str(k)] = auroc
        if chosen is None and auroc >= exact - K_TOLERANCE:
            chosen = k
    record["chosen"] = chosen
    record["method"] = (
        "validation images vs the same images under shifts other than the training negatives"
    )
    return chosen, record


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
    low_id = index.kernel_scores(lowlevel_features(val_images, side), k, t)
    low_ood = index.kernel_scores(lowlevel_features(val_shifted, side), k, t)
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
            combined_score(sdns_id, low_id, stats), combined_score(sdns_ood, low_ood, stats)
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
