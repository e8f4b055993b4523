"""`sdns-monitor report`: the self-contained HTML page about a bundle, and the ROC data that
`eval --report` leaves for it."""

from __future__ import annotations

import base64
import io
import json
import os
import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from sdns_monitor import Detector
from sdns_monitor.bundle import load_bundle
from sdns_monitor.cli import app
from sdns_monitor.errors import ConfigError, DataError, FrameError
from sdns_monitor.eval_bundle import read_eval_report
from sdns_monitor.evaluation import ood_metrics
from sdns_monitor.report import reference_images
from sdns_monitor.scoring import conformal_cutoff
from trainer.config import make_config
from trainer.fit import fit

runner = CliRunner()
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
SECTIONS = ("summary", "training", "calibration", "evaluation", "frames")


def _npz(path: Path, images: np.ndarray) -> str:
    np.savez(path, images=images)
    return f"npz:{path}"


def _report(*args: str) -> str:
    result = runner.invoke(app, ["report", "--device", "cpu", *args])
    assert result.exit_code == 0, result.output
    out = Path(args[args.index("--out") + 1])
    assert result.stdout.strip() == f"wrote {out}"
    return out.read_text(encoding="utf-8")


def _images(page: str) -> list[str]:
    return re.findall(r'<img [^>]*src="([^"]*)"', page)


def _alts(page: str, cls: str) -> list[str]:
    return re.findall(rf'<img class="{cls}" src="[^"]*" alt="([^"]*)"', page)


def _assert_self_contained(page: str) -> None:
    assert not re.search(r"""(src|href)\s*=\s*["']?\s*(https?:|//)""", page, re.I)
    assert "<script" not in page.lower() and "<link" not in page.lower()
    assert "@import" not in page and "url(" not in page
    sources = _images(page)
    assert sources
    for src in sources:
        assert src.startswith("data:image/png;base64,")
        data = base64.b64decode(src.removeprefix("data:image/png;base64,"), validate=True)
        assert data.startswith(PNG_MAGIC)
        with Image.open(io.BytesIO(data)) as image:
            assert image.width > 8 and image.height > 8


def _span(page: str, id: str) -> str:
    match = re.search(rf'<span id="{id}">([^<]+)</span>', page)
    assert match, f"no span {id!r}"
    return match.group(1)


def _row(page: str, label: str) -> str:
    match = re.search(rf"<tr><th>{re.escape(label)}</th><td>(.*?)</td></tr>", page)
    assert match, f"no row {label!r}"
    return match.group(1)


@pytest.fixture(scope="module")
def fitted(tmp_path_factory: pytest.TempPathFactory, fashion_test: np.ndarray) -> tuple[Path, str]:
    """A bundle written by the real `fit` (2 training steps) on 600 Fashion-MNIST images, with
    a reference bank subset (bank_size), and the spec of its training data."""
    root = tmp_path_factory.mktemp("fitted")
    spec = _npz(root / "reference.npz", fashion_test[600:1200])
    cfg = make_config(
        "quick",
        steps_per_epoch=2,
        batch_size=32,
        aux=[],
        neg_source="id",
        width=4,
        bank_size=300,
        score_k=20,
    )
    report = fit(spec, root / "fitted.sdns", cfg, device="cpu", log=lambda _m: None)
    assert report is not None
    return report.bundle, spec


# --- the page ---------------------------------------------------------------------------


def test_report_of_a_bundle_alone_has_every_section_and_its_real_numbers(
    tiny_bundle: Path, tmp_path: Path, det: Detector
) -> None:
    page = _report("--model", str(tiny_bundle), "--out", str(tmp_path / "r.html"))
    for key in SECTIONS:
        assert f'<section id="{key}">' in page and f'href="#{key}"' in page
    bundle = load_bundle(tiny_bundle)
    assert "Model report: tiny" in page
    assert bundle.hash in _row(page, "bundle hash (SHA-256 of the manifest)")
    assert _row(page, "backbone").startswith("cnn-small, 16 px input, 1 channel(s), width 4")
    assert _row(page, "training data") == "fashion-mnist:test[:300]"
    assert _row(page, "reference features") == "300"
    assert _row(page, "calibration scores").startswith("300 from fashion-mnist:test[300:600]")
    # The threshold printed is the Detector's: scores above it are flagged, at it are not.
    assert float(_span(page, "alarm-rate")) == det.alarm_rate == pytest.approx(0.1)
    printed = float(_span(page, "threshold"))
    expected = conformal_cutoff(det.calibration, det.alarm_rate)
    assert expected is not None and printed == pytest.approx(expected, rel=1e-5)
    flags = det.result(np.array([expected, np.nextafter(expected, np.inf)])).flags
    assert flags.tolist() == [False, True]
    # What is missing says why, and how to get it.
    assert "records no training curves" in page
    assert "No evaluation: run" in page and "No frames: pass" in page
    assert _alts(page, "plot") == ["calibration histogram"]
    _assert_self_contained(page)


def test_report_with_eval_and_frames_shows_the_evaluation_and_each_frame(
    tiny_bundle: Path,
    tmp_path: Path,
    det: Detector,
    fashion_test: np.ndarray,
) -> None:
    id_images = fashion_test[1000:1060]
    noise = np.random.default_rng(0).integers(0, 256, (40, 16, 16, 1), dtype=np.uint8)
    id_spec = _npz(tmp_path / "id.npz", id_images)
    noise_spec = _npz(tmp_path / "noise.npz", noise)
    flat_spec = _npz(tmp_path / "flat.npz", np.full((20, 16, 16, 1), 128, np.uint8))
    report_dir = tmp_path / "eval"
    args = ["eval", "--model", str(tiny_bundle), "--id", id_spec, "--ood", noise_spec]
    result = runner.invoke(app, [*args, "--ood", flat_spec, "--report", str(report_dir)])
    assert result.exit_code == 0, result.output
    png = tmp_path / "frame.png"
    Image.fromarray(noise[0, :, :, 0], mode="L").save(png)
    frames_spec = _npz(tmp_path / "frames.npz", np.concatenate([id_images[:3], noise[1:4]]))

    page = _report(
        "--model",
        str(tiny_bundle),
        "--out",
        str(tmp_path / "r.html"),
        "--eval",
        str(report_dir),
        "--frames",
        str(png),
        "--frames",
        frames_spec,
        "--max-frames",
        "5",
        "--neighbours",
        "4",
    )
    _assert_self_contained(page)

    # The metrics table and the ROC curves hold the numbers of this eval.
    id_scores = det.anomaly_scores(det.prepare(id_images))
    table = page[page.index('<table class="grid-table">') :]
    for spec, images in ((noise_spec, noise), (flat_spec, np.full((20, 16, 16, 1), 128, np.uint8))):
        m = ood_metrics(id_scores, det.anomaly_scores(det.prepare(images)))
        row = re.search(rf"<tr><td>{re.escape(spec)}</td>(.*?)</tr>", table)
        assert row is not None
        cells = re.findall(r"<td>([^<]*)</td>", row.group(1))
        assert cells == [f"{m.auroc:.4f}", f"{m.fpr95:.4f}", f"{m.aupr:.4f}", "60", str(m.n_ood)]
    assert "ROC curves" in _alts(page, "plot")
    assert _alts(page, "plot").count("score histogram") == 2  # the ones eval drew

    # Frames: the PNG file, then the spec's first frames up to --max-frames, each with the
    # Detector's score, p-value, flag and nearest references.
    frames = np.concatenate([noise[:1], id_images[:3], noise[1:2]])
    expected = det.score(frames)
    sims, ids = det.index.neighbours(det.features(det.prepare(frames)), 4)
    rows = re.findall(r'<tr class="(flagged|normal)">(.*?)</tr>', page)
    assert len(rows) == 5
    sources = re.findall(r'<div class="src">([^<]*)</div>', page)
    assert sources == [str(png), *(f"{frames_spec}[{i}]" for i in range(4))]
    for i, (kind, row) in enumerate(rows):
        assert kind == ("flagged" if expected.flags[i] else "normal")
        assert f"score <b>{expected.scores[i]:.4f}</b>" in row
        assert f"p-value <b>{expected.p_values[i]:.4g}</b>" in row
        shown = re.findall(r"#(\d+) · d ([0-9.]+)", row)
        assert [int(n) for n, _ in shown] == ids[i].tolist()
        np.testing.assert_allclose([float(d) for _, d in shown], 1 - sims[i].numpy(), atol=6e-5)
    # No reference images without --reference: only the frames have thumbnails, and the page
    # says why.
    assert len(_alts(page, "thumb")) == 5
    assert "stores the reference features, not the images" in page
    assert "--reference fashion-mnist:test[:300]" in page
    assert not any(p.suffix == ".html" for p in tiny_bundle.iterdir())  # bundle untouched


def test_report_rebuilds_the_reference_images_of_a_fitted_bundle(
    fitted: tuple[Path, str], tmp_path: Path, fashion_test: np.ndarray
) -> None:
    bundle_path, reference_spec = fitted
    bundle = load_bundle(bundle_path)
    det = Detector(bundle, device="cpu")
    # Row i of features.npy is the encoder's feature of rebuilt image i, for every row.
    bank = reference_images(bundle.manifest, reference_spec, len(bundle.features))
    assert len(bank) == 300 < bundle.manifest.training.n_train  # the seeded bank subset
    np.testing.assert_allclose(det.features(bank).numpy(), bundle.features, atol=1e-4)

    frames = _npz(tmp_path / "frames.npz", fashion_test[2000:2003])
    page = _report(
        "--model",
        str(bundle_path),
        "--out",
        str(tmp_path / "r.html"),
        "--frames",
        frames,
        "--reference",
        reference_spec,
        "--neighbours",
        "3",
    )
    _assert_self_contained(page)
    thumbs = _alts(page, "thumb")
    assert len(thumbs) == 3 * (1 + 3)  # each frame and its three nearest references
    ids = det.index.neighbours(det.features(fashion_test[2000:2003]), 3)[1]
    assert [t for t in thumbs if t.startswith("reference")] == [
        f"reference {i}" for i in ids.reshape(-1)
    ]
    shown = re.findall(r'alt="reference (\d+)">', page)
    for i, src in zip(shown, re.findall(r'src="([^"]*)" alt="reference \d+"', page), strict=True):
        data = base64.b64decode(src.removeprefix("data:image/png;base64,"))
        with Image.open(io.BytesIO(data)) as image:
            small = np.asarray(image)[:: image.width // 16, :: image.width // 16]
        np.testing.assert_array_equal(small, bank[int(i), :, :, 0])
    # The training curves and metrics of the manifest.
    assert _alts(page, "plot")[:2] == ["training curves", "calibration histogram"]
    curves = bundle.manifest.training.curves
    assert _row(page, "epoch loss (one epoch)") == f"{curves['epoch_loss'][0]:.6g}"
    assert _row(page, "recipe") == "quick"
    assert bundle.manifest.training.fingerprint in _row(page, "training data fingerprint")


# --- errors -----------------------------------------------------------------------------


def _error(args: list[str], kind: type[Exception], message: str) -> None:
    result = runner.invoke(app, ["report", "--device", "cpu", *args])
    assert result.exit_code != 0
    assert isinstance(result.exception, kind), result.output
    assert message in str(result.exception)
    assert "\n" not in str(result.exception)  # the CLI prints it as one line


def test_reference_of_other_data_is_refused(
    fitted: tuple[Path, str], tmp_path: Path, fashion_test: np.ndarray
) -> None:
    bundle_path, _ = fitted
    other = _npz(tmp_path / "other.npz", fashion_test[1200:1800])
    frames = _npz(tmp_path / "frames.npz", fashion_test[:2])
    out = tmp_path / "r.html"
    args = ["--model", str(bundle_path), "--out", str(out), "--frames", frames]
    _error([*args, "--reference", other], DataError, "is not the data this bundle was fitted on")
    assert not out.exists()


def test_reference_needs_a_fingerprint_and_frames(tiny_bundle: Path, tmp_path: Path) -> None:
    frames = _npz(tmp_path / "frames.npz", np.zeros((2, 16, 16, 1), np.uint8))
    args = ["--model", str(tiny_bundle), "--out", str(tmp_path / "r.html")]
    _error(
        [*args, "--frames", frames, "--reference", "fashion-mnist:test"],
        DataError,
        "records no training-data fingerprint",
    )
    _error([*args, "--reference", "fashion-mnist:test"], ConfigError, "give both")


def test_bad_frames_and_eval_directories_are_one_line_errors(
    tiny_bundle: Path, fitted: tuple[Path, str], tmp_path: Path, fashion_test: np.ndarray
) -> None:
    args = ["--model", str(tiny_bundle), "--out", str(tmp_path / "r.html")]
    _error(
        [*args, "--frames", str(tmp_path / "missing.png")],
        DataError,
        "no such file, and not a dataset spec",
    )
    broken = tmp_path / "broken.png"
    broken.write_bytes(PNG_MAGIC + b"truncated")
    _error([*args, "--frames", str(broken)], FrameError, f"--frames {broken}: ")
    _error([*args, "--eval", str(tmp_path / "nope")], DataError, "no such directory")
    plain = tmp_path / "plain"
    plain.mkdir()
    Image.new("L", (20, 20)).save(plain / "roc_x.png")
    _error([*args, "--eval", str(plain)], DataError, "holds no ROC data")
    # An eval of another bundle would put its curves under this bundle's name.
    spec = _npz(tmp_path / "id.npz", fashion_test[:30])
    ood = _npz(tmp_path / "ood.npz", fashion_test[30:60, ::-1])
    report_dir = tmp_path / "eval"
    result = runner.invoke(
        app,
        [
            "eval",
            "--model",
            str(fitted[0]),
            "--id",
            spec,
            "--ood",
            ood,
            "--report",
            str(report_dir),
            "--device",
            "cpu",
        ],
    )
    assert result.exit_code == 0, result.output
    _error([*args, "--eval", str(report_dir)], DataError, "was made with bundle fitted")


# --- the ROC data eval leaves ---------------------------------------------------------------


def test_eval_report_plots_carry_the_numbers_of_the_latest_run(
    tiny_bundle: Path, tmp_path: Path, det: Detector, fashion_test: np.ndarray
) -> None:
    id_spec = _npz(tmp_path / "id.npz", fashion_test[1000:1040])
    a = _npz(tmp_path / "a.npz", fashion_test[1040:1060, ::-1])
    b = _npz(tmp_path / "b.npz", np.full((10, 16, 16, 1), 255, np.uint8))
    report_dir = tmp_path / "eval"
    base = ["eval", "--model", str(tiny_bundle), "--id", id_spec, "--report", str(report_dir)]
    for oods in ([b], [a, b], [b, a]):
        args = [*base, *(x for spec in oods for x in ("--ood", spec)), "--json"]
        result = runner.invoke(app, args)
        assert result.exit_code == 0, result.output
    records = read_eval_report(report_dir)
    summary = json.loads(result.stdout)
    assert [r["ood"] for r in records] == [b, a]  # the last run's order, older plots ignored
    for record, row in zip(records, summary["results"], strict=True):
        assert record["model"] == {"name": "tiny", "hash": det.hash}
        assert record["id"] == id_spec and record["score"] == "sdns"
        for key in ("auroc", "fpr95", "aupr"):
            assert record[key] == pytest.approx(row[key])
        assert record["n_id"] == 40
        assert record["fpr"][0] == record["tpr"][0] == 0.0
        assert record["fpr"][-1] == record["tpr"][-1] == 1.0
        assert np.all(np.diff(record["fpr"]) >= 0) and np.all(np.diff(record["tpr"]) >= 0)
        assert (report_dir / record["histogram"]).is_file()


# --- in a browser -------------------------------------------------------------------------


def _chromium() -> str | None:
    for name in ("chromium", "chromium-browser", "google-chrome"):
        if found := shutil.which(name):
            return found
    return None


def test_the_page_renders_in_headless_chromium(
    fitted: tuple[Path, str], tmp_path: Path, fashion_test: np.ndarray
) -> None:
    chromium = _chromium()
    if chromium is None:
        if os.environ.get("CI"):
            pytest.fail("chromium is not installed; `make venv` installs it (apt chromium)")
        pytest.skip("chromium is not installed (`apt-get install chromium`)")
    bundle_path, reference_spec = fitted
    id_spec = _npz(tmp_path / "id.npz", fashion_test[2000:2100])
    ood_spec = _npz(tmp_path / "ood.npz", fashion_test[2100:2200, ::-1])
    args = ["eval", "--model", str(bundle_path), "--id", id_spec, "--ood", ood_spec]
    result = runner.invoke(app, [*args, "--report", str(tmp_path / "eval"), "--device", "cpu"])
    assert result.exit_code == 0, result.output
    page = tmp_path / "report.html"
    _report(
        "--model",
        str(bundle_path),
        "--out",
        str(page),
        "--eval",
        str(tmp_path / "eval"),
        "--frames",
        id_spec,
        "--frames",
        ood_spec,
        "--max-frames",
        "6",
        "--reference",
        reference_spec,
    )
    shot = tmp_path / "shot.png"
    proc = subprocess.run(
        [
            chromium,
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-dev-shm-usage",
            "--hide-scrollbars",
            f"--user-data-dir={tmp_path / 'profile'}",
            f"--screenshot={shot}",
            "--window-size=1280,4000",
            page.as_uri(),
        ],
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert proc.returncode == 0 and shot.is_file(), proc.stderr[-2000:]
    with Image.open(shot) as image:
        pixels = np.asarray(image.convert("RGB")).astype(np.int16)
    assert pixels.shape == (4000, 1280, 3)
    assert pixels.std() > 20  # text, plots and thumbnails, not a blank page
    colours = np.unique(pixels.reshape(-1, 3)[::7], axis=0)
    assert len(colours) > 100  # antialiased text, plot colours, grey thumbnails
    # Content (dark pixels) from the title down to the frames near the end of the page.
    dark_rows = np.flatnonzero((pixels.sum(axis=2) < 200).any(axis=1))
    assert dark_rows.min() < 100 and dark_rows.max() > 2500
    # The flagged / normal frame markers (red or green) are drawn.
    red = (pixels[..., 0] > 170) & (pixels[..., 1] < 80) & (pixels[..., 2] < 80)
    green = (pixels[..., 1] > 100) & (pixels[..., 0] < 80) & (pixels[..., 2] < 80)
    assert red.sum() + green.sum() > 500
