"""Offline evaluation of anomaly scores: AUROC, FPR at 95% TPR, AUPR, and their plots.

One sign convention throughout: a higher score means more out-of-distribution. In-distribution
(ID) scores are the negatives (label 0), out-of-distribution (OOD) scores the positives (label 1).

Example:
    >>> m = ood_metrics(id_scores, ood_scores)
    >>> print(f"AUROC {m.auroc:.3f}  FPR95 {m.fpr95:.3f}")
    >>> plot_roc({"sdns": (id_scores, ood_scores)}, Path("reports/roc.png"), "MNIST vs Fashion")
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
from matplotlib.figure import Figure
from sklearn.metrics import average_precision_score, roc_auc_score, roc_curve

__all__ = ["OodMetrics", "ood_metrics", "plot_histogram", "plot_roc", "roc_points"]

_TARGET_TPR = 0.95


@dataclass(frozen=True)
class OodMetrics:
    """Detection quality of one score on one ID/OOD pair.

    auroc: area under the ROC curve (0.5 = chance, 1 = perfect separation).
    fpr95: fraction of ID samples flagged at the threshold that detects 95% of the OOD samples
        (lower is better).
    aupr: average precision with OOD as the positive class.
    """

    auroc: float
    fpr95: float
    aupr: float
    n_id: int
    n_ood: int


def ood_metrics(id_scores: np.ndarray, ood_scores: np.ndarray) -> OodMetrics:
    """AUROC, FPR at 95% TPR and AUPR (OOD positive) of anomaly scores.

    FPR95 takes the first point of the ROC curve (all thresholds, none dropped) whose TPR is at
    least 0.95, i.e. the highest threshold t such that at least 95% of OOD scores are >= t, and
    reports the fraction of ID scores >= t. No linear interpolation between ROC points: every
    reported value is achievable by an actual threshold.

    Raises:
        ValueError: an empty array or a NaN / infinite score.
    """
    ids = _scores(id_scores, "id_scores")
    oods = _scores(ood_scores, "ood_scores")
    labels, scores = _labelled(ids, oods)
    # drop_intermediate=False: dropping collinear points could skip the exact point where the
    # TPR first reaches 0.95 and overstate the FPR.
    fpr, tpr, _ = roc_curve(labels, scores, drop_intermediate=False)
    first = int(np.searchsorted(tpr, _TARGET_TPR, side="left"))
    return OodMetrics(
        auroc=float(roc_auc_score(labels, scores)),
        fpr95=float(fpr[first]),
        aupr=float(average_precision_score(labels, scores)),
        n_id=int(ids.size),
        n_ood=int(oods.size),
    )


def roc_points(id_scores: np.ndarray, ood_scores: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The ROC curve as plotted: (false positive rates, true positive rates), OOD positive."""
    labels, scores = _labelled(_scores(id_scores, "id_scores"), _scores(ood_scores, "ood_scores"))
    fpr, tpr, _ = roc_curve(labels, scores)
    return fpr, tpr


def plot_roc(
    curves: dict[str, tuple[np.ndarray, np.ndarray]],
    path: Path,
    title: str,
    metadata: dict[str, str] | None = None,
) -> None:
    """Draw one ROC curve per entry of `curves` (name -> (id_scores, ood_scores)) to a PNG.

    The legend gives each curve's AUROC and FPR95, so the plot can be read without the table.
    `metadata` goes into the PNG's text chunks. Parent directories of `path` are created.
    """
    if not curves:
        raise ValueError("plot_roc needs at least one curve: pass {name: (id_scores, ood_scores)}")
    fig = Figure(figsize=(5.5, 5.0), layout="constrained")
    ax = fig.add_subplot()
    for name, (id_scores, ood_scores) in curves.items():
        ids = _scores(id_scores, f"{name}: id_scores")
        oods = _scores(ood_scores, f"{name}: ood_scores")
        fpr, tpr = roc_points(ids, oods)
        m = ood_metrics(ids, oods)
        ax.plot(fpr, tpr, label=f"{name} (AUROC {m.auroc:.3f}, FPR95 {m.fpr95:.3f})")
    ax.plot([0, 1], [0, 1], linestyle="--", color="grey", linewidth=0.8, label="chance")
    ax.axhline(_TARGET_TPR, linestyle=":", color="grey", linewidth=0.8)
    ax.set(xlim=(0, 1), ylim=(0, 1.01), title=title)
    ax.set_xlabel("false positive rate (ID flagged)")
    ax.set_ylabel("true positive rate (OOD flagged)")
    ax.legend(loc="lower right", fontsize="small")
    _save(fig, path, metadata)


def plot_histogram(
    id_scores: np.ndarray,
    ood_scores: np.ndarray,
    path: Path,
    title: str,
    threshold: float | None = None,
) -> None:
    """Overlay the ID and OOD score distributions (shared bins, density) in a PNG.

    With `threshold`, a vertical line marks where frames start being flagged.
    Parent directories of `path` are created.
    """
    ids = _scores(id_scores, "id_scores")
    oods = _scores(ood_scores, "ood_scores")
    if threshold is not None and not np.isfinite(threshold):
        raise ValueError(f"threshold must be finite, got {threshold}")
    # Shared bin edges, so the two histograms are comparable bar for bar.
    edges = np.histogram_bin_edges(np.concatenate([ids, oods]), bins=60).tolist()
    fig = Figure(figsize=(6.5, 4.0), layout="constrained")
    ax = fig.add_subplot()
    ax.hist(ids, bins=edges, density=True, alpha=0.55, label=f"in-distribution (n={ids.size})")
    ax.hist(oods, bins=edges, density=True, alpha=0.55, label=f"OOD (n={oods.size})")
    if threshold is not None:
        ax.axvline(threshold, color="black", linestyle="--", label=f"threshold {threshold:.4g}")
    ax.set_title(title)
    ax.set_xlabel("anomaly score (higher = more OOD)")
    ax.set_ylabel("density")
    ax.legend(fontsize="small")
    _save(fig, path)


def _scores(values: np.ndarray, name: str) -> np.ndarray:
    """Scores as a flat float64 array; empty or non-finite input is a caller error."""
    array = np.asarray(values, dtype=np.float64).ravel()
    if array.size == 0:
        raise ValueError(f"{name} is empty: need at least one score")
    bad = int(np.count_nonzero(~np.isfinite(array)))
    if bad:
        raise ValueError(f"{name} holds {bad} NaN or infinite score(s): fix the scorer first")
    return array


def _labelled(ids: np.ndarray, oods: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Labels (ID 0, OOD 1) and the matching concatenated scores."""
    labels = np.concatenate([np.zeros(ids.size, dtype=np.int8), np.ones(oods.size, dtype=np.int8)])
    return labels, np.concatenate([ids, oods])


def _save(fig: Figure, path: Path, metadata: dict[str, str] | None = None) -> None:
    """Write a figure as PNG. A bare Figure renders with Agg, never touching pyplot's state."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, format="png", dpi=120, metadata=metadata)
