"""Choosing the score on validation images, after training (a stage of `trainer.fit`).

Validation images were carved from the training split and kept out of the reference bank. The
same images under shifting transformations (rotations, permutations: new content) and under
synthetic camera degradations (trainer.degradations: blur, noise, exposure, colour, occlusion,
compression, flat frames) stand in for out-of-distribution data; each shift or degradation is
a family, and a choice is judged by the mean AUROC over families. On them fit

1. chooses k, the number of nearest reference features the kernel score sums over (`choose_k`;
   `--k` or the recipe can fix it instead),
2. measures an approximate index against exact search (`approximation_quality`),
3. builds the low-level parts of the combined score (pooled pixels, image statistics),
   standardises each, picks the parts that earn their place and makes the combined score the
   bundle's default when it beats SDNS alone (`build_lowlevel`).

`select_score` runs the three and returns a `ScoreSelection`."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import torch

from sdns_monitor.bundle import InputSpec, LowLevelPart, LowLevelSpec, StatisticsSpec
from sdns_monitor.evaluation import ood_metrics
from sdns_monitor.features import extract_features
from sdns_monitor.index import ReferenceIndex, approximation_quality
from sdns_monitor.lowlevel import (
    DEFAULT_K,
    STATISTICS_K,
    LowLevelScorer,
    image_statistics,
    lowlevel_features,
    pooled_side,
    statistics_names,
)
from sdns_monitor.scoring import combined_score
from trainer.config import TrainConfig
from trainer.degradations import degrade, families_for
from trainer.negatives import shift

# Candidate k for the top-k kernel score, compared with k = all on validation data.
K_CANDIDATES = (10, 50, 200, 1000)
# The smallest k whose validation AUROC is within this of k = all becomes the default.
K_TOLERANCE = 0.002
# Shifts that make the synthetic out-of-distribution validation set used to choose k.
VALIDATION_SHIFTS = ("rot", "perm4", "pixperm", "perm16")
# Fewer validation images than this measure nothing: k stays as configured, no combined score.
MIN_VALIDATION = 20
# Validation images per shift or degradation family (the first ones of the split).
MAX_PER_FAMILY = 1000
# A low-level part joins the combined score only when it raises the mean validation AUROC by
# at least this much (each choice has to earn its cost).
PART_GAIN = 0.005


@dataclass(frozen=True)
class ValidationSet:
    """Validation images, the same images shifted and degraded (synthetic out-of-distribution
    data, `families` says which rows of `shifted` each shift or degradation made), and the
    teacher's features of both."""

    images: np.ndarray
    shifted: np.ndarray
    id_features: torch.Tensor
    ood_features: torch.Tensor
    families: dict[str, slice]


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
    shifted, families = shifted_validation(
        images, cfg.seed, exclude={cfg.negatives, *cfg.validation_exclude}
    )
    return ValidationSet(
        images,
        shifted,
        extract_features(teacher, images, spec, device),
        extract_features(teacher, shifted, spec, device),
        families,
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
        index,
        validation.id_features,
        validation.ood_features,
        cfg.score_temperature,
        validation.families,
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
    spec, bank = build_lowlevel(train_images, validation, sdns_val, cfg, device)
    v = spec.validation
    log(
        "mean validation AUROC over "
        f"{len(validation.families)} shifts and degradations: sdns {v['auroc_sdns']:.3f}, "
        + ", ".join(f"sdns+{name} {auroc:.3f}" for name, auroc in v["auroc_by_parts"].items())
        + f"; default score {v['default']}"
        + (f" (sdns+{'+'.join(spec.parts)})" if v["default"] == "combined" else "")
    )
    return spec, bank


def family_aurocs(
    id_scores: np.ndarray, ood_scores: np.ndarray, families: dict[str, slice]
) -> dict[str, float]:
    """AUROC of in-distribution validation scores against each family's shifted ones."""
    return {name: ood_metrics(id_scores, ood_scores[rows]).auroc for name, rows in families.items()}


def mean_auroc(id_scores: np.ndarray, ood_scores: np.ndarray, families: dict[str, slice]) -> float:
    """The mean over families of `family_aurocs`: every shift or degradation counts alike,
    however easy."""
    return float(np.mean(list(family_aurocs(id_scores, ood_scores, families).values())))


def shifted_validation(
    images: np.ndarray, seed: int, exclude: set[str] | None = None
) -> tuple[np.ndarray, dict[str, slice]]:
    """Synthetic out-of-distribution images: validation images under the semantic shifts
    (VALIDATION_SHIFTS) and the camera degradations (trainer.degradations) that apply to their
    channels, at most MAX_PER_FAMILY images each, and which rows each family made.

    `exclude` leaves out families by name: the shift the encoder was trained to reject (it
    would flatter it), and any the caller holds back (the benchmark's leave-one-out).
    """
    exclude = exclude or set()
    rng = np.random.default_rng(seed + 3)
    subset = images[:MAX_PER_FAMILY]
    x = torch.from_numpy(subset).permute(0, 3, 1, 2).float()
    gen = torch.Generator().manual_seed(seed)
    parts: dict[str, np.ndarray] = {}
    for kind in VALIDATION_SHIFTS:
        if kind not in exclude:
            shifted = shift(x, kind, gen).round().clamp(0, 255).byte().permute(0, 2, 3, 1)
            parts[kind] = shifted.numpy()
    for family in families_for(images.shape[-1], exclude):
        parts[family] = degrade(subset, family, rng)
    rows: dict[str, slice] = {}
    start = 0
    for name, part in parts.items():
        rows[name] = slice(start, start + len(part))
        start += len(part)
    return np.concatenate(list(parts.values())), rows


def choose_k(
    index: ReferenceIndex,
    id_feats: torch.Tensor,
    ood_feats: torch.Tensor,
    temperature: float,
    families: dict[str, slice] | None = None,
) -> tuple[int | None, dict[str, Any]]:
    """The smallest candidate k whose validation AUROC (ID vs shifted ID; with `families`,
    the mean over them) is within K_TOLERANCE of the exact k = all score (METHOD.md: top-k
    may not keep the ranking)."""

    def auroc(k: int | None) -> float:
        ids = index.kernel_scores(id_feats, k, temperature)
        oods = index.kernel_scores(ood_feats, k, temperature)
        return mean_auroc(ids, oods, families) if families else ood_metrics(ids, oods).auroc

    exact = auroc(None)
    record: dict[str, Any] = {"auroc_all": exact, "tolerance": K_TOLERANCE, "auroc_by_k": {}}
    chosen: int | None = None
    for k in K_CANDIDATES:
        if k >= len(index):
            break
        record["auroc_by_k"][str(k)] = measured = auroc(k)
        if chosen is None and measured >= exact - K_TOLERANCE:
            chosen = k
    record["chosen"] = chosen
    record["method"] = (
        "validation images vs the same images under shifts other than the training negatives"
        + (" and camera degradations, mean AUROC over families" if families else "")
    )
    return chosen, record


# The low-level parts the combined score may add to SDNS, smallest first.
CANDIDATES: tuple[tuple[LowLevelPart, ...], ...] = (
    ("pixels",),
    ("statistics",),
    ("pixels", "statistics"),
)


def choose_parts(
    per_family: dict[tuple[LowLevelPart, ...], dict[str, float]],
    sdns_per_family: dict[str, float],
    families: list[str],
) -> tuple[tuple[LowLevelPart, ...], Literal["sdns", "combined"]]:
    """The parts of the combined score and the default score, by mean validation AUROC over
    `families`: the better single part, both parts only when they gain PART_GAIN over it, and
    the combined score as the default only when it gains PART_GAIN over SDNS alone."""

    def mean(aurocs: dict[str, float]) -> float:
        return float(np.mean([aurocs[f] for f in families]))

    best = max(CANDIDATES[:2], key=lambda c: mean(per_family[c]))
    if mean(per_family[CANDIDATES[2]]) >= mean(per_family[best]) + PART_GAIN:
        best = CANDIDATES[2]
    gain = mean(per_family[best]) - mean(sdns_per_family)
    return best, "combined" if gain >= PART_GAIN else "sdns"


def build_lowlevel(
    train_images: np.ndarray,
    validation: ValidationSet,
    sdns_val: tuple[np.ndarray, np.ndarray],
    cfg: TrainConfig,
    device: torch.device,
) -> tuple[LowLevelSpec, np.ndarray]:
    """The low-level bank, the standardisation of each part of the combined score and the
    parts it adds, all from training data: the bank from training images (at most
    `lowlevel_bank`) with the image statistics standardised over it, each score's mean and
    std from validation images (in neither bank).

    Which parts: the combined score over every subset of {pixels, statistics} is measured
    (mean validation AUROC over the families, `mean_auroc`); a subset is taken over a smaller
    one only when it gains PART_GAIN, and the combined score becomes the default only when it
    gains PART_GAIN over SDNS alone. `sdns_val` holds the SDNS scores of the validation
    images and of their shifted copies."""
    side = pooled_side(train_images.shape[1], train_images.shape[-1])
    images = train_images
    if len(images) > cfg.lowlevel_bank:
        pick = np.random.default_rng(cfg.seed + 2).choice(len(images), cfg.lowlevel_bank, False)
        images = images[np.sort(pick)]
    pixels_bank = lowlevel_features(images, side)
    stats_bank = image_statistics(images)
    stats_mean = stats_bank.mean(0)
    stats_std = stats_bank.std(0).clamp_min(1e-3)
    bank = torch.cat([pixels_bank, stats_bank], dim=1).numpy()
    # The spec with every part and unit moments: the shipped scorer gives the validation
    # scores, so they are computed exactly as `run` will compute them.
    draft = LowLevelSpec(
        side=side,
        temperature=cfg.score_temperature,
        k=min(DEFAULT_K, len(bank)),
        n_reference=len(bank),
        sdns_mean=0.0,
        sdns_std=1.0,
        low_mean=0.0,
        low_std=1.0,
        statistics=StatisticsSpec(
            names=statistics_names(train_images.shape[-1]),
            mean=stats_mean.tolist(),
            std=stats_std.tolist(),
            k=STATISTICS_K,
            score_mean=0.0,
            score_std=1.0,
        ),
        parts=["pixels", "statistics"],
    )
    scorer = LowLevelScorer(draft, bank, device)
    id_parts = scorer.part_scores(validation.images)
    ood_parts = scorer.part_scores(validation.shifted)
    scores: dict[str, tuple[np.ndarray, np.ndarray]] = {
        "sdns": sdns_val,
        **{part: (id_parts[part], ood_parts[part]) for part in id_parts},
    }
    moments = {
        name: (float(ids.mean()), float(max(ids.std(), 1e-6))) for name, (ids, _) in scores.items()
    }

    def combined(parts: tuple[str, ...], which: int) -> np.ndarray:
        return combined_score([(scores[p][which], *moments[p]) for p in ("sdns", *parts)])

    families = validation.families
    per_family = {c: family_aurocs(combined(c, 0), combined(c, 1), families) for c in CANDIDATES}
    sdns_per_family = family_aurocs(*sdns_val, families)
    best, default = choose_parts(per_family, sdns_per_family, list(families))
    by_parts = {c: float(np.mean(list(per_family[c].values()))) for c in CANDIDATES}
    # What the choice would have been without each family: the camera benchmark's measure of
    # how much of a fault's detection comes from having seen its kind (k is not re-chosen).
    without = {}
    for family in families:
        parts, dflt = choose_parts(
            per_family, sdns_per_family, [f for f in families if f != family]
        )
        without[family] = "+".join(parts) if dflt == "combined" else "sdns"
    assert draft.statistics is not None
    spec = draft.model_copy(
        update=dict(
            sdns_mean=moments["sdns"][0],
            sdns_std=moments["sdns"][1],
            low_mean=moments["pixels"][0],
            low_std=moments["pixels"][1],
            statistics=draft.statistics.model_copy(
                update=dict(score_mean=moments["statistics"][0], score_std=moments["statistics"][1])
            ),
            parts=list(best),
            validation={
                "auroc_sdns": float(np.mean(list(sdns_per_family.values()))),
                "auroc_low": mean_auroc(*scores["pixels"], families),
                "auroc_statistics": mean_auroc(*scores["statistics"], families),
                "auroc_combined": by_parts[best],
                "auroc_by_parts": {"+".join(c): by_parts[c] for c in CANDIDATES},
                "by_family": {"sdns": sdns_per_family, "combined": per_family[best]},
                "default": default,
                "without_family": without,
                "method": "validation images vs the same images under shifts (other than the "
                "training negatives) and synthetic camera degradations, mean AUROC over families; "
                f"a part or the combined score is kept when it gains >= {PART_GAIN}",
            },
        )
    )
    return spec, bank
