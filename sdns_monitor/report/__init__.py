"""`sdns-monitor report`: one self-contained HTML page about a model bundle.

The page holds the bundle summary (identity, backbone, recipe, training data, alarm rate and
the score threshold it implies), the training curves, the calibration scores with that
threshold, the ROC curves and metrics of an `eval --report DIR` (`--eval`), and frames
(`--frames`) with their score, p-value, flag and nearest references. Every image is inline
(base64 PNG) and nothing is fetched, so the file can be mailed or archived as it is.

The bundle keeps the reference *features*, not the images. Neighbour thumbnails therefore need
`--reference SPEC`, the data the bundle was fitted on: the training images are rebuilt the way
`fit` split them and accepted only if their SHA-256 matches the manifest's training-data
fingerprint. Without it the page lists neighbour indices and distances.

`write_model_report` gathers the parts and writes the page: `frames` (loaded and scored),
`references` (the rebuilt reference images), `eval_report` (an eval read back), `figures` (the
plots), `page` (the HTML sections and their assembly), `images` (PNG and `data:` URIs).

>>> write_model_report("models/cam1.sdns", Path("cam1.html"), frames=["folder:/data/today"])
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path

from sdns_monitor.detector import Detector, ScoreMode, check_rule
from sdns_monitor.errors import ConfigError
from sdns_monitor.report.eval_report import EvalReport, read_eval
from sdns_monitor.report.figures import calibration_png, roc_png, training_curves_png
from sdns_monitor.report.gallery import FrameRow, load_frames, score_frames
from sdns_monitor.report.images import THUMB_PX, data_uri, png_bytes, thumbnail
from sdns_monitor.report.page import render_report
from sdns_monitor.report.references import check_neighbours, reference_images

__all__ = [
    "THUMB_PX",
    "EvalReport",
    "FrameRow",
    "calibration_png",
    "check_neighbours",
    "data_uri",
    "load_frames",
    "png_bytes",
    "read_eval",
    "reference_images",
    "render_report",
    "roc_png",
    "score_frames",
    "thumbnail",
    "training_curves_png",
    "write_model_report",
]


def write_model_report(
    model: str | Path,
    out: Path,
    *,
    eval_dir: Path | None = None,
    frames: Sequence[str] = (),
    max_frames: int = 16,
    reference: str | None = None,
    neighbours: int = 5,
    alarm_rate: float | None = None,
    score: ScoreMode = "auto",
    device: str = "auto",
    log: Callable[[str], None] = lambda _m: None,
) -> Path:
    """Write the report page of the bundle at `model` to `out` and return `out`."""
    check_rule(alarm_rate, None)
    if reference is not None and not frames:
        raise ConfigError("--reference shows the nearest reference images of --frames; give both")
    det = Detector.load(model, device=device, score=score)
    evaluation = read_eval(eval_dir, det) if eval_dir is not None else None
    rows = bank = None
    why = ""
    if frames:
        spec = det.manifest.input
        images, sources = load_frames(frames, spec.size, spec.channels, max_frames)
        rows = score_frames(det, images, sources, neighbours, alarm_rate)
        if reference is not None:
            bank = reference_images(det.manifest, reference, len(det.index), log)
            check_neighbours(det, bank, rows)
        else:
            hint = det.manifest.training.data or "the spec of fit --data"
            why = (
                "The bundle stores the reference features, not the images, so no thumbnails: "
                f"pass --reference {hint} (checked against the manifest's training-data "
                "fingerprint) to see them."
            )
    page = render_report(
        det, alarm_rate=alarm_rate, evaluation=evaluation, frames=rows, bank=bank, why_no_images=why
    )
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(page, encoding="utf-8")
    return out
