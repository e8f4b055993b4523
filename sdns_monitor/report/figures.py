"""The page's plots as PNG bytes: training curves, calibration scores, ROC curves."""

from __future__ import annotations

import io
import math
from typing import TYPE_CHECKING, Any

import numpy as np

from sdns_monitor.report.gallery import FrameRow

if TYPE_CHECKING:
    from matplotlib.figure import Figure

_GRID_COLUMNS = 2  # training-curve panels per row


def _figure_png(fig: Figure) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, metadata={"Software": None})
    return buf.getvalue()


_CURVE_LABELS = {
    "step_loss": "loss",
    "epoch_loss": "total",
    "epoch_positive": "positive views (distillation)",
    "epoch_negative": "negatives (to uniform)",
    "epoch_lr": "learning rate",
    "epoch_seconds": "seconds",
}


def training_curves_png(curves: dict[str, list[float]]) -> bytes | None:
    """The manifest's training curves of two points or more, one panel per kind (None when
    there are none; a one-epoch run's epoch curves are single values, for a table)."""
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    groups: list[tuple[str, str, list[str]]] = [
        ("loss per step", "step", ["step_loss"]),
        ("loss per epoch", "epoch", ["epoch_loss", "epoch_positive", "epoch_negative"]),
        ("learning rate at the end of each epoch", "epoch", ["epoch_lr"]),
        ("seconds per epoch", "epoch", ["epoch_seconds"]),
    ]
    known = {name for _, _, names in groups for name in names}
    groups += [(name.replace("_", " "), "index", [name]) for name in curves if name not in known]
    panels = [(t, x, [n for n in names if len(curves.get(n, [])) > 1]) for t, x, names in groups]
    panels = [p for p in panels if p[2]]
    if not panels:
        return None
    columns = min(len(panels), _GRID_COLUMNS)
    rows = math.ceil(len(panels) / columns)
    fig = Figure(figsize=(5.25 * columns, 3.3 * rows), layout="constrained")
    for i, (title, xlabel, names) in enumerate(panels):
        ax = fig.add_subplot(rows, columns, i + 1)
        for name in names:
            values = curves[name]
            x = np.arange(1, len(values) + 1)
            ax.plot(
                x,
                values,
                marker="o" if len(values) <= 30 else None,
                linewidth=1.2,
                label=_CURVE_LABELS.get(name, name),
            )
        if "lr" in names[0]:
            ax.set_yscale("log")
        ax.set(title=title, xlabel=xlabel)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
        if len(names) > 1:
            ax.legend(fontsize="small")
    return _figure_png(fig)


def calibration_png(
    calibration: np.ndarray, threshold: float | None, alarm_rate: float, frames: list[FrameRow]
) -> bytes:
    """Histogram of the calibration scores, the threshold, and the frames' scores as ticks."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(9.0, 3.6), layout="constrained")
    ax = fig.add_subplot()
    bins = int(np.clip(2 * np.sqrt(calibration.size), 10, 60))
    label = f"calibration scores (n={calibration.size})"
    ax.hist(calibration, bins=bins, color="#7a9cc6", label=label)
    if threshold is not None:
        ax.axvline(
            threshold,
            color="#c0392b",
            linestyle="--",
            linewidth=1.5,
            label=f"threshold {threshold:.4g} (alarm rate {alarm_rate:g})",
        )
    if frames:
        flagged = [r.score for r in frames if r.flagged]
        normal = [r.score for r in frames if not r.flagged]
        for scores, colour, label in (
            (normal, "#2e7d32", "frames"),
            (flagged, "#c0392b", "flagged frames"),
        ):
            if scores:
                ax.plot(
                    scores,
                    np.zeros(len(scores)),
                    "|",
                    color=colour,
                    markersize=22,
                    markeredgewidth=2,
                    label=label,
                    clip_on=False,
                )
    ax.set_xlabel("anomaly score (higher = more out-of-distribution)")
    ax.set_ylabel("calibration images")
    ax.legend(fontsize="small")
    return _figure_png(fig)


def roc_png(records: list[dict[str, Any]]) -> bytes:
    """The ROC curves of an eval report, one per OOD set, from the points eval stored."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6.0, 5.2), layout="constrained")
    ax = fig.add_subplot()
    for r in records:
        ax.plot(r["fpr"], r["tpr"], linewidth=1.5, label=f"{r['ood']} (AUROC {r['auroc']:.3f})")
    ax.plot([0, 1], [0, 1], linestyle="--", color="grey", linewidth=0.8, label="chance")
    ax.axhline(0.95, linestyle=":", color="grey", linewidth=0.8)
    ax.set(xlim=(0, 1), ylim=(0, 1.01), title=f"{records[0]['id']} vs OOD sets")
    ax.set_xlabel("false positive rate (in-distribution flagged)")
    ax.set_ylabel("true positive rate (OOD flagged)")
    ax.legend(loc="lower right", fontsize="small")
    return _figure_png(fig)
