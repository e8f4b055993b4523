"""Offline evaluation of a bundle on data sets (`sdns-monitor eval`); the metrics and plots
themselves live in `sdns_monitor.evaluation`.

With a report directory, each OOD set's ROC plot (`roc_SLUG.png`) also carries its numbers as
JSON in the PNG text chunk `sdns-eval` (model, data, metrics and the curve), so that
`sdns-monitor report --eval DIR` redraws the curves and the table from the files eval wrote
(`read_eval_report`).
"""

from __future__ import annotations

import json
import re
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, UnidentifiedImageError

from sdns_monitor.data import load_dataset
from sdns_monitor.detector import Detector, ScoreMode
from sdns_monitor.errors import DataError
from sdns_monitor.evaluation import ood_metrics, plot_histogram, plot_roc, roc_points
from sdns_monitor.scoring import conformal_cutoff

EVAL_KEY = "sdns-eval"  # PNG text chunk of a per-set ROC plot
# A stored ROC curve keeps at most this many points: plenty for a plot, and the PNG stays
# small (about 40 kB of text) however many images were scored.
ROC_POINTS = 2000


def _limited(images: np.ndarray, limit: int | None, seed: int = 0) -> np.ndarray:
    if limit is None or len(images) <= limit:
        return images
    pick = np.random.default_rng(seed).choice(len(images), limit, replace=False)
    return images[np.sort(pick)]


def _slug(spec: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", spec).strip("_")[:80] or "ood"


def evaluate_bundle(
    model: str | Path,
    id_spec: str,
    ood_specs: list[str],
    *,
    report_dir: Path | None = None,
    limit: int | None = None,
    device: str = "auto",
    detector: Detector | None = None,
    score: ScoreMode = "auto",
) -> dict[str, Any]:
    """{"id": SPEC, "results": [{"ood": SPEC, "auroc", "fpr95", "aupr"}, ...]} (higher score =
    more OOD; OOD is the positive class), and "score": the score used (sdns or combined).
    With `report_dir`, a ROC and a histogram PNG per set (the ROC PNG carries its numbers:
    `read_eval_report`)."""
    det = detector or Detector.load(model, device=device, score=score)
    size = det.manifest.input.size

    def scores_of(spec: str) -> np.ndarray:
        images = _limited(load_dataset(spec, size=size).images, limit)
        if len(images) == 0:
            raise DataError(f"{spec}: no images to evaluate")
        return det.anomaly_scores(det.prepare(images))

    id_scores = scores_of(id_spec)
    results, curves = [], {}
    written_at = datetime.now(UTC).isoformat(timespec="microseconds")
    for position, spec in enumerate(ood_specs):
        scores = scores_of(spec)
        m = ood_metrics(id_scores, scores)
        results.append({"ood": spec, "auroc": m.auroc, "fpr95": m.fpr95, "aupr": m.aupr})
        curves[spec] = (id_scores, scores)
        if report_dir is not None:
            report_dir.mkdir(parents=True, exist_ok=True)
            fpr, tpr = _thinned(*roc_points(id_scores, scores))
            record = {
                "model": {"name": det.name, "hash": det.hash},
                "score": det.score_mode,
                "id": id_spec,
                "written_at": written_at,
                "position": position,
                **results[-1],
                "n_id": m.n_id,
                "n_ood": m.n_ood,
                "fpr": fpr,
                "tpr": tpr,
                "histogram": f"hist_{_slug(spec)}.png",
            }
            plot_roc(
                {spec: curves[spec]},
                report_dir / f"roc_{_slug(spec)}.png",
                f"{id_spec} vs {spec}",
                metadata={EVAL_KEY: json.dumps(record)},
            )
            threshold = conformal_cutoff(det.calibration, det.alarm_rate)
            plot_histogram(
                id_scores,
                scores,
                report_dir / f"hist_{_slug(spec)}.png",
                f"{id_spec} vs {spec}",
                threshold,
            )
    if report_dir is not None and len(curves) > 1:
        plot_roc(curves, report_dir / "roc_all.png", f"{id_spec} vs all OOD sets")
    return {"id": id_spec, "score": det.score_mode, "results": results}


def _thinned(fpr: np.ndarray, tpr: np.ndarray) -> tuple[list[float], list[float]]:
    """At most ROC_POINTS points of a curve, first and last kept, at evenly spaced indices:
    the ROC keeps only the points where it bends, so that is where the points crowd."""
    keep = np.unique(np.linspace(0, len(fpr) - 1, min(len(fpr), ROC_POINTS)).round().astype(int))
    return np.round(fpr[keep], 6).tolist(), np.round(tpr[keep], 6).tolist()


def read_eval_report(report_dir: Path) -> list[dict[str, Any]]:
    """The per-set records of the latest `eval --report` run into `report_dir`, in the order
    of its --ood options: {"model": {"name", "hash"}, "score", "id", "ood", "auroc", "fpr95",
    "aupr", "n_id", "n_ood", "fpr", "tpr", "histogram" (its file name), ...}. Plots left by
    earlier runs into the same directory are ignored. Raises DataError when there are none."""
    report_dir = Path(report_dir)
    if not report_dir.is_dir():
        raise DataError(
            f"--eval {report_dir}: no such directory; give the DIR of `eval --report DIR`"
        )
    records = []
    for path in sorted(report_dir.glob("roc_*.png")):
        try:
            with Image.open(path) as image:
                text = getattr(image, "text", {}).get(EVAL_KEY)
        except (OSError, UnidentifiedImageError, ValueError):
            continue  # not a plot eval wrote
        if text is None:
            continue  # roc_all.png, or a plot of an older version
        try:
            records.append(json.loads(text))
        except json.JSONDecodeError:
            raise DataError(f"{path}: its {EVAL_KEY} data is damaged; run eval again") from None
    if not records:
        raise DataError(
            f"--eval {report_dir} holds no ROC data (roc_*.png carrying {EVAL_KEY} text); run "
            "`sdns-monitor eval ... --report DIR` again with this version and pass that DIR"
        )
    latest = max(str(r.get("written_at", "")) for r in records)
    records = [r for r in records if str(r.get("written_at", "")) == latest]
    return sorted(records, key=lambda r: r.get("position", 0))
