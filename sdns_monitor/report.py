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

>>> write_model_report("models/cam1.sdns", Path("cam1.html"), frames=["folder:/data/today"])
"""

from __future__ import annotations

import base64
import hashlib
import html
import io
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from PIL import Image

from sdns_monitor import __version__
from sdns_monitor.bundle import FEATURES, Manifest
from sdns_monitor.detector import Detector, ScoreMode, check_rule
from sdns_monitor.errors import ConfigError, DataError, FrameError

if TYPE_CHECKING:
    from matplotlib.figure import Figure

THUMB_PX = 84  # small frames are enlarged (whole pixels) to about this size
_GRID_COLUMNS = 2  # training-curve panels per row


# ---------------------------------------------------------------------- images in HTML
def png_bytes(image: np.ndarray, scale: int = 1) -> bytes:
    """A uint8 H x W x C image (C in 1, 3) as PNG bytes, enlarged `scale` times (nearest)."""
    pil = Image.fromarray(image[..., 0] if image.shape[-1] == 1 else image)
    if scale > 1:
        pil = pil.resize((pil.width * scale, pil.height * scale), Image.Resampling.NEAREST)
    buf = io.BytesIO()
    pil.save(buf, format="PNG")
    return buf.getvalue()


def data_uri(png: bytes) -> str:
    """PNG bytes as a `data:` URI, for an <img> that needs no other file."""
    return "data:image/png;base64," + base64.b64encode(png).decode("ascii")


def thumbnail(image: np.ndarray, alt: str) -> str:
    """An <img> of a small frame, enlarged by whole pixels to about THUMB_PX."""
    scale = max(1, THUMB_PX // max(image.shape[:2]))
    return f'<img class="thumb" src="{data_uri(png_bytes(image, scale))}" alt="{html.escape(alt)}">'


def _figure_png(fig: Figure) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, metadata={"Software": None})
    return buf.getvalue()


def _plot(png: bytes, alt: str) -> str:
    return f'<img class="plot" src="{data_uri(png)}" alt="{html.escape(alt)}">'


# ---------------------------------------------------------------------- frames
@dataclass(frozen=True)
class FrameRow:
    """One frame on the page: what the model saw, its result and its nearest references."""

    source: str
    image: np.ndarray  # uint8 H x W x C at the model's input size
    score: float
    p_value: float
    flagged: bool
    neighbour_ids: np.ndarray  # int64 (k,): rows of the bundle's features.npy
    neighbour_distances: np.ndarray  # cosine distances 1 - <z, z_i>


def load_frames(
    values: Sequence[str], size: int, channels: int, max_frames: int
) -> tuple[np.ndarray, list[str]]:
    """Frames from image files (PNG, JPEG, WebP, .npy), directories of images or dataset
    specs, in the order given, prepared for the model (uint8 N x size x size x channels), and
    where each came from. `max_frames` is shared between the values: each takes its first
    frames, up to an even share of what the values before it left."""
    from sdns_monitor.data import load_dataset, parse_spec, usage
    from sdns_monitor.frames import decode_bytes
    from sdns_monitor.preprocess import prepare_uint8

    parts: list[np.ndarray] = []
    sources: list[str] = []
    for position, value in enumerate(values):
        left = math.ceil((max_frames - len(sources)) / (len(values) - position))
        if left <= 0:
            break
        path = Path(value)
        if path.is_file():
            try:
                frames = decode_bytes(path.read_bytes())[:left]
            except FrameError as exc:
                raise FrameError(f"--frames {value}: {exc}") from None
            names = [value] if len(frames) == 1 else [f"{value}[{i}]" for i in range(len(frames))]
        else:
            spec = f"folder:{value}" if path.is_dir() else value
            try:
                parse_spec(spec)
            except DataError:
                raise DataError(
                    f"--frames {value}: no such file, and not a dataset spec ({usage()})"
                ) from None
            data = load_dataset(spec, size=size)
            frames = data.images[:left]
            names = (data.sources or [f"{spec}[{i}]" for i in range(len(data))])[:left]
        parts.append(prepare_uint8(frames, size, channels))
        sources.extend(names)
    if not sources:
        raise DataError("--frames gave no images; pass image files, a directory or a spec")
    return np.concatenate(parts), sources


def score_frames(
    det: Detector,
    images: np.ndarray,
    sources: list[str],
    neighbours: int,
    alarm_rate: float | None = None,
) -> list[FrameRow]:
    """Score, p-value and flag of each frame (as `Detector.score`), and its `neighbours`
    nearest reference features (the encoder's features, whatever the score mode)."""
    prepared = det.prepare(images)
    result = det.score(prepared, alarm_rate=alarm_rate)
    k = min(neighbours, len(det.index))
    sims, ids = det.index.neighbours(det.features(prepared), k)
    rows = []
    for i, source in enumerate(sources):
        found = ids[i] >= 0  # an approximate index may find fewer than k
        rows.append(
            FrameRow(
                source=source,
                image=prepared[i],
                score=float(result.scores[i]),
                p_value=float(result.p_values[i]),
                flagged=bool(result.flags[i]),
                neighbour_ids=ids[i][found].astype(np.int64),
                neighbour_distances=(1.0 - sims[i].numpy())[found],
            )
        )
    return rows


# ---------------------------------------------------------------------- reference images
def _fingerprint(images: np.ndarray) -> str:
    """SHA-256 of images as `fit` records it (trainer.fit.fingerprint)."""
    h = hashlib.sha256()
    h.update(str(images.shape).encode())
    h.update(np.ascontiguousarray(images).tobytes())
    return h.hexdigest()


def _training_split(images: np.ndarray, config: dict[str, Any]) -> np.ndarray:
    """The training images of `fit`'s seeded split (trainer.fit.split_reference, mirrored here
    because scoring code never imports the trainer; the fingerprint check catches any drift)."""
    n = len(images)
    order = np.random.default_rng(config["seed"]).permutation(n)
    n_cal = min(config["max_calibration"], max(1, round(config["calibration_fraction"] * n)))
    n_val = round(config["validation_fraction"] * (n - n_cal))
    return images[np.sort(order[n_cal + n_val :])]


def reference_images(
    manifest: Manifest, spec: str, n_features: int, log: Callable[[str], None] = lambda _m: None
) -> np.ndarray:
    """The images behind the bundle's reference features (row i of features.npy is image i),
    rebuilt from `spec`, the data the bundle was fitted on.

    Raises DataError unless the rebuilt training images have the manifest's fingerprint.
    """
    from sdns_monitor.data import load_dataset, parse_spec
    from sdns_monitor.preprocess import prepare_uint8

    training = manifest.training
    config = training.config
    needed = ("seed", "max_calibration", "calibration_fraction", "validation_fraction")
    if not training.fingerprint or any(key not in config for key in needed):
        raise DataError(
            f"--reference {spec}: this bundle records no training-data fingerprint and split "
            "(it was not written by `sdns-monitor fit`), so the images cannot be checked; "
            "leave out --reference to list neighbour indices"
        )
    size, channels = manifest.input.size, manifest.input.channels
    log(f"rebuilding the reference images from {spec}")
    # fit loads image folders at the data size, other data at its native size unless
    # --image-size was given; the two differ only where colour images are resized.
    folder = parse_spec(spec).name == "folder"
    loaded = load_dataset(spec, size=size if folder else None).images
    train = _training_split(prepare_uint8(loaded, size, channels), config)
    if _fingerprint(train) != training.fingerprint and loaded.shape[1:3] != (size, size):
        loaded = load_dataset(spec, size=size).images
        train = _training_split(prepare_uint8(loaded, size, channels), config)
    if _fingerprint(train) != training.fingerprint:
        raise DataError(
            f"--reference {spec} is not the data this bundle was fitted on (its training split "
            f"does not match the manifest's fingerprint {training.fingerprint[:12]}...); pass "
            f"the spec of `fit --data` ({training.data or 'not recorded'}) with the same files"
        )
    bank_size = config.get("bank_size")
    if bank_size is not None and bank_size < len(train):  # fit's seeded subset of the bank
        pick = np.random.default_rng(config["seed"] + 1).choice(
            len(train), bank_size, replace=False
        )
        train = train[np.sort(pick)]
    if len(train) != n_features:
        raise DataError(
            f"--reference {spec}: rebuilt {len(train)} reference images for the bundle's "
            f"{n_features} reference features; the bundle's bank was built differently"
        )
    return train


def check_neighbours(det: Detector, bank: np.ndarray, rows: list[FrameRow]) -> None:
    """The rebuilt images of the neighbours shown must give the bundle's stored features
    (cosine >= 0.99), so a thumbnail never shows an image the index does not hold."""
    ids = np.unique(np.concatenate([r.neighbour_ids for r in rows]))
    if ids.size == 0:
        return
    rebuilt = det.features(bank[ids]).cpu().numpy()
    cosine = np.sum(rebuilt * det.bundle.features[ids], axis=1)
    if float(cosine.min()) < 0.99:
        raise DataError(
            f"the rebuilt reference images do not give the bundle's {FEATURES} (cosine "
            f"{float(cosine.min()):.3f}); leave out --reference to list neighbour indices"
        )


# ---------------------------------------------------------------------- evaluation
@dataclass(frozen=True)
class EvalReport:
    """What an `eval --report DIR` holds: one record per OOD set (eval_bundle.read_eval_report)
    and the score histograms eval drew, as PNG bytes."""

    records: list[dict[str, Any]]
    histograms: list[bytes]


def read_eval(eval_dir: Path, det: Detector) -> EvalReport:
    """The eval report in `eval_dir`; DataError unless it was made with `det`'s bundle."""
    from sdns_monitor.eval_bundle import read_eval_report

    records = read_eval_report(eval_dir)
    made_by = records[0].get("model", {})
    if made_by.get("hash") != det.hash:
        raise DataError(
            f"--eval {eval_dir} was made with bundle {made_by.get('name')} "
            f"({str(made_by.get('hash'))[:12]}), not {det.name} ({det.hash[:12]}); "
            "evaluate this bundle or pass its own --model"
        )
    names = [str(r.get("histogram", "")) for r in records]
    files = [Path(eval_dir) / n for n in names if n and Path(n).name == n]
    return EvalReport(records, [f.read_bytes() for f in files if f.is_file()])


# ---------------------------------------------------------------------- plots
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


# ---------------------------------------------------------------------- the page
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
        parts.append(_plot(png, "training curves"))
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
        + _plot(roc_png(records), "ROC curves")
        + "".join(_plot(png, "score histogram") for png in evaluation.histograms)
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
            + _plot(
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
