"""Offline evaluation of a bundle on data sets (`sdns-monitor eval`); the metrics and plots
themselves live in `sdns_monitor.evaluation`."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import numpy as np

from sdns_monitor.data import load_dataset
from sdns_monitor.detector import Detector, ScoreMode
from sdns_monitor.errors import DataError
from sdns_monitor.evaluation import ood_metrics, plot_histogram, plot_roc
from sdns_monitor.scoring import conformal_cutoff


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
    more OOD; OOD is the positive class), and "score": the score used (sdns or combined). With `report_dir`, a ROC and a histogram PNG per set."""
    det = detector or Detector.load(model, device=device, score=score)
    size = det.manifest.input.size

    def scores_of(spec: str) -> np.ndarray:
        images = _limited(load_dataset(spec, size=size).images, limit)
        if len(images) == 0:
            raise DataError(f"{spec}: no images to evaluate")
        return det.anomaly_scores(det.prepare(images))

    id_scores = scores_of(id_spec)
    results, curves = [], {}
    for spec in ood_specs:
        scores = scores_of(spec)
        m = ood_metrics(id_scores, scores)
        results.append({"ood": spec, "auroc": m.auroc, "fpr95": m.fpr95, "aupr": m.aupr})
        curves[spec] = (id_scores, scores)
        if report_dir is not None:
            report_dir.mkdir(parents=True, exist_ok=True)
            plot_roc(
                {spec: curves[spec]}, report_dir / f"roc_{_slug(spec)}.png", f"{id_spec} vs {spec}"
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
