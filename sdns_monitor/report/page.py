"""The HTML page: its sections (bundle summary, training, calibration, evaluation, frames),
their tables and the stylesheet, assembled by `render_report`."""

from __future__ import annotations

import html
from collections.abc import Sequence
from datetime import UTC, datetime
from typing import Any

import numpy as np

from sdns_monitor import __version__
from sdns_monitor.detector import Detector
from sdns_monitor.report.eval_report import EvalReport
from sdns_monitor.report.figures import calibration_png, roc_png, training_curves_png
from sdns_monitor.report.gallery import FrameRow
from sdns_monitor.report.images import plot_image, thumbnail


def _fmt(value: Any) -> str:
    if value is None:
        return "—"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        return f"{value:.6g}"
    if isinstance(value, dict):
        return ", ".join(f"{k} {_fmt(v)}" for k, v in value.items())
    if isinstance(value, list | tuple):
        return ", ".join(_fmt(v) for v in value)
    return str(value)


class _Html(str):
    """Markup to put in a table cell as it is (everything else is escaped)."""


def _table(rows: Sequence[tuple[str, Any]]) -> str:
    cells = [(k, v if isinstance(v, _Html) else html.escape(_fmt(v))) for k, v in rows]
    body = "".join(f"<tr><th>{html.escape(k)}</th><td>{v}</td></tr>" for k, v in cells)
    return f'<table class="kv">{body}</table>'


def _code(text: str) -> _Html:
    return _Html(f"<code>{html.escape(text)}</code>")


def _summary(det: Detector, threshold: float | None, alarm_rate: float) -> str:
    m = det.manifest
    b = m.backbone
    backbone = f"{b.name}, {b.image_size} px input, {b.in_channels} channel(s)"
    backbone += f", width {b.width}" if b.name.startswith("cnn") else f", patch {b.patch_size}"
    spec = m.score
    rule = (
        _Html(
            f'<span id="threshold">{threshold:.6g}</span> (a frame is flagged when its score is '
            f"above this, i.e. its p-value is below {alarm_rate:g})"
        )
        if threshold is not None
        else _Html(
            f"none: {det.calibration.size} calibration scores cannot give a p-value below "
            f"{alarm_rate:g}; recalibrate with more images"
        )
    )
    rows: list[tuple[str, Any]] = [
        ("name", m.name),
        ("bundle hash (SHA-256 of the manifest)", _code(det.hash)),
        ("path", str(det.bundle.path)),
        ("created / library version", f"{m.created_at} / sdns-monitor {m.library_version}"),
        ("backbone", f"{backbone}; {m.feature_dim}-d features"),
        ("recipe", m.training.config.get("recipe", "not recorded")),
        ("training data", m.training.data or "not recorded"),
        ("training data fingerprint", _code(m.training.fingerprint or "not recorded")),
        ("training / validation images", f"{m.training.n_train} / {m.training.n_validation}"),
        (
            "score",
            f"{det.score_mode} (bundle default: {spec.default if spec.lowlevel else 'sdns'})",
        ),
        (
            "kernel: temperature, top-k, index",
            f"T {spec.temperature:g}, k {spec.k or 'all'}, {spec.index_factory}",
        ),
        ("reference features", f"{len(det.index)}"),
        (
            "calibration scores",
            f"{det.calibration.size} from {m.calibration.data or 'not recorded'}",
        ),
        (
            "alarm rate",
            _Html(
                f'<span id="alarm-rate">{alarm_rate:g}</span>'
                + (" (the bundle's default)" if alarm_rate == det.alarm_rate else " (overridden)")
            ),
        ),
        ("threshold on the score", rule),
    ]
    return _table(rows)


def _training_section(det: Detector) -> str:
    t = det.manifest.training
    png = training_curves_png(t.curves)
    parts = []
    if png is not None:
        parts.append(plot_image(png, "training curves"))
    elif not t.curves:
        parts.append(
            '<p class="note">The manifest records no training curves (the bundle was not '
            "written by <code>sdns-monitor fit</code>).</p>"
        )
    rows: list[tuple[str, Any]] = [
        (name.replace("_", " ") + (" (one epoch)" if name.startswith("epoch") else ""), values[0])
        for name, values in t.curves.items()
        if len(values) == 1
    ]
    rows += [(k.replace("_", " "), v) for k, v in t.metrics.items()]
    if t.wall_seconds:
        rows.append(("fit wall time (s)", t.wall_seconds))
    if t.aux:
        rows.append(("auxiliary data for negatives", t.aux))
    selection = det.manifest.score.k_selection
    if selection.get("auroc_by_k"):
        by_k = f"{_fmt(selection['auroc_by_k'])} ({_fmt(selection.get('auroc_all'))})"
        rows.append(("validation AUROC by k (k = all)", by_k))
    low = det.manifest.score.lowlevel
    if low is not None and low.validation:
        rows.append(("validation AUROC of the scores", low.validation))
    if rows:
        parts.append(_table(rows))
    return "".join(parts)


def _eval_section(evaluation: EvalReport | None) -> str:
    if evaluation is None:
        return (
            '<p class="note">No evaluation: run <code>sdns-monitor eval --model M --id SPEC '
            "--ood SPEC --report DIR</code> and pass <code>--eval DIR</code>.</p>"
        )
    records = evaluation.records
    first = records[0]
    head = "".join(
        f"<th>{h}</th>" for h in ("OOD data", "AUROC", "FPR95", "AUPR", "ID images", "OOD images")
    )
    body = "".join(
        f"<tr><td>{html.escape(str(r['ood']))}</td><td>{r['auroc']:.4f}</td>"
        f"<td>{r['fpr95']:.4f}</td><td>{r['aupr']:.4f}</td><td>{r['n_id']}</td>"
        f"<td>{r['n_ood']}</td></tr>"
        for r in records
    )
    return (
        f"<p>In-distribution data <code>{html.escape(str(first['id']))}</code>, "
        f"{html.escape(str(first['score']))} score; higher score = more out-of-distribution, "
        "OOD is the positive class.</p>"
        f'<table class="grid-table"><tr>{head}</tr>{body}</table>'
        + '<div class="plots">'
        + plot_image(roc_png(records), "ROC curves")
        + "".join(plot_image(png, "score histogram") for png in evaluation.histograms)
        + "</div>"
    )


def _frames_section(
    rows: list[FrameRow] | None, bank: np.ndarray | None, why_no_images: str
) -> str:
    if rows is None:
        return (
            '<p class="note">No frames: pass <code>--frames</code> image files, a directory or '
            "a dataset spec to see their scores and nearest reference images.</p>"
        )
    note = (
        "Nearest references by cosine distance (1 − cosine similarity) of the encoder's "
        "features; #i is row i of the bundle's reference bank."
    )
    if bank is None:
        note += f" {why_no_images}"
    out = [
        f'<p class="note">{html.escape(note)}</p><table class="frames">',
        "<tr><th>frame</th><th>result</th><th>nearest references</th></tr>",
    ]
    for r in rows:
        flag = (
            '<span class="flag">FLAGGED</span>' if r.flagged else '<span class="ok">normal</span>'
        )
        cells = []
        for idx, dist in zip(r.neighbour_ids, r.neighbour_distances, strict=True):
            caption = f"#{idx}<br>d {max(dist, 0.0):.4f}"
            if bank is not None:
                image = thumbnail(bank[idx], f"reference {idx}")
                cells.append(f"<figure>{image}<figcaption>{caption}</figcaption></figure>")
            else:
                cells.append(f'<span class="nb">{caption.replace("<br>", " · ")}</span>')
        out.append(
            f'<tr class="{"flagged" if r.flagged else "normal"}"><td><figure>'
            f"{thumbnail(r.image, r.source)}</figure></td>"
            f'<td><div class="src">{html.escape(r.source)}</div>{flag}'
            f"<div>score <b>{r.score:.4f}</b></div><div>p-value <b>{r.p_value:.4g}</b></div></td>"
            f'<td><div class="neighbours">{"".join(cells)}</div></td></tr>'
        )
    out.append("</table>")
    return "".join(out)


_CSS = """
body { font-family: system-ui, -apple-system, "Segoe UI", sans-serif; margin: 0; color: #222;
       background: #fafafa; line-height: 1.4; }
main { max-width: 1100px; margin: 0 auto; padding: 1.5em 2em 3em; background: #fff; }
h1 { margin: 0 0 0.2em; font-size: 1.7em; }
h2 { margin-top: 1.8em; border-bottom: 2px solid #e3e3e3; padding-bottom: 0.2em; }
.sub { color: #666; margin: 0 0 1em; }
nav a { margin-right: 1.2em; color: #2a5d9f; text-decoration: none; }
table { border-collapse: collapse; margin: 0.8em 0 1.2em; }
th, td { border: 1px solid #ddd; padding: 4px 10px; text-align: left; vertical-align: top; }
table.kv th { background: #f4f6f8; font-weight: 600; width: 18em; }
table.grid-table th { background: #f4f6f8; }
table.grid-table td:not(:first-child) { text-align: right; font-variant-numeric: tabular-nums; }
code { font-size: 0.9em; word-break: break-all; }
.note { color: #555; background: #f4f6f8; padding: 0.6em 0.9em; border-left: 4px solid #9bb3d1; }
img.plot { max-width: 100%; display: block; margin: 0.5em 0; }
.plots { display: flex; flex-wrap: wrap; gap: 1%; }
.plots img.plot { max-width: 49%; }
img.thumb { image-rendering: pixelated; border: 1px solid #999; max-width: 96px; display: block; }
figure { margin: 0; text-align: center; font-size: 11px; color: #444; }
table.frames td { padding: 6px 10px; }
table.frames tr.flagged td:first-child { border-left: 5px solid #c0392b; }
table.frames tr.normal td:first-child { border-left: 5px solid #2e7d32; }
.src { font-size: 12px; color: #555; max-width: 16em; word-break: break-all; margin-bottom: 4px; }
.flag { color: #fff; background: #c0392b; padding: 1px 6px; border-radius: 3px; font-size: 12px; }
.ok { color: #fff; background: #2e7d32; padding: 1px 6px; border-radius: 3px; font-size: 12px; }
.neighbours { display: flex; flex-wrap: wrap; gap: 8px; }
.nb { font-family: ui-monospace, monospace; font-size: 12px; background: #f4f6f8;
      padding: 2px 6px; border-radius: 3px; }
"""


def render_report(
    det: Detector,
    *,
    alarm_rate: float | None = None,
    evaluation: EvalReport | None = None,
    frames: list[FrameRow] | None = None,
    bank: np.ndarray | None = None,
    why_no_images: str = "",
) -> str:
    """The page as a string (see the module docstring); `bank` = the reference images."""
    from sdns_monitor.scoring import conformal_cutoff

    rate = det.alarm_rate if alarm_rate is None else alarm_rate
    threshold = conformal_cutoff(det.calibration, rate)
    name = html.escape(det.name)
    sections = [
        ("summary", "Bundle", _summary(det, threshold, rate)),
        ("training", "Training", _training_section(det)),
        (
            "calibration",
            "Calibration scores",
            f"<p>Scores of the {det.calibration.size} held-out calibration images "
            f"({html.escape(det.score_mode)} score); the p-value of a frame is the fraction of "
            "these at least as high as its score.</p>"
            + plot_image(
                calibration_png(det.calibration, threshold, rate, frames or []),
                "calibration histogram",
            ),
        ),
        ("evaluation", "Evaluation", _eval_section(evaluation)),
        ("frames", "Frames", _frames_section(frames, bank, why_no_images)),
    ]
    nav = "".join(f'<a href="#{key}">{title}</a>' for key, title, _ in sections)
    body = "".join(
        f'<section id="{key}"><h2>{title}</h2>{content}</section>'
        for key, title, content in sections
    )
    written = datetime.now(UTC).isoformat(timespec="seconds")
    return (
        f'<!doctype html><html lang="en"><head><meta charset="utf-8">'
        f"<title>sdns-monitor report: {name}</title><style>{_CSS}</style></head><body><main>"
        f"<h1>Model report: {name}</h1>"
        f'<p class="sub">bundle {html.escape(det.hash[:16])}… · written {written} by '
        f"sdns-monitor {__version__}</p><nav>{nav}</nav>{body}</main></body></html>\n"
    )
