"""The anomaly score and its p-value: the formulas, in one place.

`kernel_score` turns similarities into the kernel score (searched by
`ReferenceIndex.kernel_scores`), `combined_score` adds the low-level parts to it, `p_values` makes
conformal p-values; `Detector.anomaly_scores` is the score of a bundle's chosen mode.

Kernel density of a feature z among N reference features z_i (METHOD.md "Score"):

    s(z) = (1/N) * sum_i exp((<z, z_i> - 1) / T)        higher = more in-distribution
    a(z) = -log s(z)                                     higher = more out-of-distribution

With top-k neighbours only the k largest similarities enter the sum (still divided by N, so
top-k and exact scores share one scale). The conformal p-value of a score is the fraction of
calibration scores at least as large, (1 + #{c >= a}) / (n + 1): flagging p < alpha gives a
false alarm rate of at most alpha on exchangeable in-distribution frames.

Precision contract: similarities are fp32 inner products of unit vectors of dimension D, and
the score is taken from them in float64. BLAS picks other kernels for other shapes, thread
counts and CPUs, so the same similarity can come out differently; each is within
gamma_D ~ D * 2**-24 of the exact value (the standard bound for a dot product, |x||y| = 1).
Since the weights of the log-sum-exp sum to one, |da| <= max |ds_i| / T, so two computations of
one score (chunked or not, any batch, any machine) agree within `score_tolerance(D, T)`.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

FP32_UNIT_ROUNDOFF = 2.0**-24


def score_tolerance(dim: int, temperature: float) -> float:
    """How far apart two fp32 computations of one anomaly score may be (absolute): twice the
    similarity error bound D * 2**-24, over T (see the precision contract above)."""
    return 2.0 * dim * FP32_UNIT_ROUNDOFF / temperature


def kernel_score(similarities: torch.Tensor, n_reference: int, temperature: float) -> torch.Tensor:
    """a(z) from the similarities of each query to (its top-k or all) reference features.

    similarities: M x k cosine similarities; returns M anomaly scores (float64 for stable ranks).
    """
    s = similarities.double()
    return math.log(n_reference) - torch.logsumexp((s - 1.0) / temperature, dim=1)


def combined_score(parts: Sequence[tuple[np.ndarray, float, float]]) -> np.ndarray:
    """The combined score (sdns_monitor.lowlevel): each part's score standardised by its
    (mean, std) on in-distribution validation images, added; `parts` = (scores, mean, std)."""
    total = np.zeros_like(np.asarray(parts[0][0], dtype=np.float64))
    for scores, mean, std in parts:
        total = total + (np.asarray(scores, dtype=np.float64) - mean) / std
    return total


def p_values(scores: np.ndarray, calibration: np.ndarray) -> np.ndarray:
    """Conformal p-values of `scores` against sorted `calibration` scores."""
    n = calibration.shape[0]
    at_least = n - np.searchsorted(calibration, scores, side="left")
    return (1.0 + at_least) / (n + 1.0)


def cannot_flag(n_calibration: int, alarm_rate: float) -> str | None:
    """Why no frame can ever be flagged at `alarm_rate`, if so: the smallest p-value is
    1 / (n + 1), so fewer than 1 / alarm_rate - 1 calibration scores flag nothing."""
    if 1.0 / (n_calibration + 1.0) < alarm_rate:
        return None
    need = int(np.ceil(1.0 / alarm_rate))
    return (
        f"with {n_calibration} calibration scores the smallest p-value is "
        f"{1.0 / (n_calibration + 1.0):.3g}, not below the alarm rate {alarm_rate:g}: nothing "
        f"can be flagged; recalibrate on at least {need} images or raise the alarm rate"
    )


def conformal_cutoff(calibration: np.ndarray, alarm_rate: float) -> float | None:
    """The smallest score whose p-value is below `alarm_rate`'s rule boundary: scores above it
    are flagged (None when no score can be, i.e. fewer than 1/alarm_rate calibration scores).

    p(a) < alpha  <=>  #{c >= a} < alpha (n + 1) - 1; with sorted c this holds for every a above
    c[j - 1], where j = n - ceil(alpha (n + 1) - 1) + 1 is the number of scores that must lie
    strictly below a.
    """
    n = calibration.shape[0]
    need_below = n - math.ceil(alarm_rate * (n + 1) - 1) + 1
    if need_below > n or need_below < 1:
        return None
    return float(np.sort(calibration)[need_below - 1])


@dataclass(frozen=True)
class ScoreResult:
    """Per-image results of `Detector.score`. Higher score = more out-of-distribution."""

    scores: np.ndarray  # float64 (N,)
    p_values: np.ndarray  # float64 (N,), in (0, 1]
    flags: np.ndarray  # bool (N,)
    alarm_rate: float | None  # the rule that set the flags: p < alarm_rate ...
    threshold: float | None  # ... or score > threshold

    def __len__(self) -> int:
        return int(self.scores.shape[0])
