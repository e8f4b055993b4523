"""The `sdns-monitor` command line: info, score, eval, calibrate, and one-line errors."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from sdns_monitor import Detector
from sdns_monitor.bundle import CALIBRATION, ENCODER, FEATURES, load_bundle
from sdns_monitor.cli import app, main
from sdns_monitor.errors import BundleError, ConfigError, DataError
from sdns_monitor.evaluation import ood_metrics

CONSOLE_SCRIPT = Path(sys.executable).parent / "sdns-monitor"
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"

runner = CliRunner()


@pytest.fixture(scope="module")
def id_images(fashion_test: np.ndarray) -> np.ndarray:
    return fashion_test[1000:1060].copy()


@pytest.fixture(scope="module")
def ood_images() -> np.ndarray:
    return np.random.default_rng(0).integers(0, 256, (40, 16, 16, 1), dtype=np.uint8)


def _npz(path: Path, images: np.ndarray) -> str:
    np.savez(path, images=images)
    return f"npz:{path}"


def _json_lines(text: str) -> list[dict[str, object]]:
    return [json.loads(line) for line in text.splitlines() if line.strip()]


# --- info ------------------------------------------------------------------------------


def test_info_prints_the_verified_manifest_summary(tiny_bundle: Path) -> None:
    result = runner.invoke(app, ["info", "--model", str(tiny_bundle)])
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)
    bundle = load_bundle(tiny_bundle)
    assert summary["name"] == "tiny"
    assert summary["hash"] == bundle.hash
    assert summary["backbone"]["name"] == "cnn-small"
    assert summary["input"]["size"] == 16
    assert summary["score"]["k"] == 50
    assert summary["calibration"]["n"] == 300
    assert summary["calibration"]["default_alarm_rate"] == pytest.approx(0.1)


# --- score -----------------------------------------------------------------------------


def test_score_npz_prints_one_json_line_per_image(
    tiny_bundle: Path, tmp_path: Path, det: Detector, id_images: np.ndarray
) -> None:
    spec = _npz(tmp_path / "frames.npz", id_images[:10])
    result = runner.invoke(app, ["score", spec, "--model", str(tiny_bundle), "--device", "cpu"])
    assert result.exit_code == 0, result.output
    rows = _json_lines(result.stdout)
    assert len(rows) == 10
    expected = det.score(id_images[:10])
    for i, row in enumerate(rows):
        assert set(row) == {"index", "source", "score", "p_value", "flagged"}
        assert row["index"] == i
        assert row["source"] == spec  # npz files carry no per-image origin
        assert row["score"] == pytest.approx(expected.scores[i], abs=1e-6)
        assert row["p_value"] == pytest.approx(expected.p_values[i])
        assert row["flagged"] == bool(expected.flags[i])


def test_score_folder_reports_file_paths_and_threshold_flags(
    tiny_bundle: Path, tmp_path: Path, det: Detector, id_images: np.ndarray
) -> None:
    folder = tmp_path / "frames"
    folder.mkdir()
    paths = []
    for i in range(3):
        p = folder / f"f{i}.png"
        Image.fromarray(id_images[i, :, :, 0], mode="L").save(p)
        paths.append(str(p))
    expected = det.score(id_images[:3]).scores
    threshold = float(np.median(expected))
    result = runner.invoke(
        app,
        ["score", f"folder:{folder}", "--model", str(tiny_bundle), "--threshold", str(threshold)],
    )
    assert result.exit_code == 0, result.output
    rows = _json_lines(result.stdout)
    assert [r["source"] for r in rows] == paths
    np.testing.assert_allclose([r["score"] for r in rows], expected, atol=1e-6)
    assert [r["flagged"] for r in rows] == [bool(s > threshold) for s in expected]


def test_score_with_both_rules_is_a_config_error(tiny_bundle: Path, tmp_path: Path) -> None:
    spec = _npz(tmp_path / "x.npz", np.zeros((2, 16, 16, 1), np.uint8))
    args = ["score", spec, "--model", str(tiny_bundle), "--alarm-rate", "0.1", "--threshold", "1"]
    result = runner.invoke(app, args)
    assert result.exit_code != 0
    assert isinstance(result.exception, ConfigError)
    assert result.stdout == ""


# --- eval ------------------------------------------------------------------------------


def test_eval_json_prints_exactly_one_object_with_the_metrics(
    tiny_bundle: Path,
    tmp_path: Path,
    det: Detector,
    id_images: np.ndarray,
    ood_images: np.ndarray,
) -> None:
    id_spec = _npz(tmp_path / "id.npz", id_images)
    noise_spec = _npz(tmp_path / "noise.npz", ood_images)
    flat_spec = _npz(tmp_path / "flat.npz", np.full((20, 16, 16, 1), 128, np.uint8))
    args = ["eval", "--model", str(tiny_bundle), "--id", id_spec]
    args += ["--ood", noise_spec, "--ood", flat_spec, "--json"]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)  # the whole output is one JSON document
    assert result.stdout.strip().count("\n") == 0
    assert set(report) == {"id", "score", "results"} and report["score"] == "sdns"
    assert report["id"] == id_spec
    assert [r["ood"] for r in report["results"]] == [noise_spec, flat_spec]
    id_scores = det.anomaly_scores(det.prepare(id_images))
    for row, images in zip(
        report["results"], [ood_images, np.full((20, 16, 16, 1), 128, np.uint8)], strict=True
    ):
        assert set(row) == {"ood", "auroc", "fpr95", "aupr"}
        m = ood_metrics(id_scores, det.anomaly_scores(det.prepare(images)))
        assert row["auroc"] == pytest.approx(m.auroc)
        assert row["fpr95"] == pytest.approx(m.fpr95)
        assert row["aupr"] == pytest.approx(m.aupr)


def test_eval_report_writes_plots_and_a_table(
    tiny_bundle: Path, tmp_path: Path, id_images: np.ndarray, ood_images: np.ndarray
) -> None:
    id_spec = _npz(tmp_path / "id.npz", id_images[:30])
    a = _npz(tmp_path / "a.npz", ood_images[:20])
    b = _npz(tmp_path / "b.npz", ood_images[20:])
    report = tmp_path / "report"
    args = ["eval", "--model", str(tiny_bundle), "--id", id_spec, "--ood", a, "--ood", b]
    result = runner.invoke(app, [*args, "--report", str(report)])
    assert result.exit_code == 0, result.output
    lines = result.stdout.splitlines()
    assert "AUROC" in lines[1] and "FPR95" in lines[1] and "AUPR" in lines[1]
    assert lines[2].startswith(a) and lines[3].startswith(b)
    pngs = sorted(p.name for p in report.iterdir())
    assert len(pngs) == 5  # a ROC and a histogram per OOD set, and one ROC of all sets
    assert "roc_all.png" in pngs
    assert sum(n.startswith("roc_") for n in pngs) == 3
    assert sum(n.startswith("hist_") for n in pngs) == 2
    for name in pngs:
        assert (report / name).read_bytes().startswith(PNG_MAGIC)
    assert not any(p.name.endswith(".png") for p in tiny_bundle.iterdir())  # bundle untouched


# --- calibrate -------------------------------------------------------------------------


def test_calibrate_writes_a_new_bundle_with_the_same_encoder(
    tiny_bundle: Path, tmp_path: Path, det: Detector, fashion_test: np.ndarray
) -> None:
    cal_images = fashion_test[2000:2040]
    spec = _npz(tmp_path / "cal.npz", cal_images)
    out = tmp_path / "new.sdns"
    old = load_bundle(tiny_bundle)
    args = ["calibrate", "--model", str(tiny_bundle), "--data", spec, "--out", str(out)]
    result = runner.invoke(app, [*args, "--alarm-rate", "0.2"])
    assert result.exit_code == 0, result.output
    assert str(out) in result.stdout

    new = load_bundle(out)
    assert new.name == "new"
    assert new.hash != old.hash
    assert new.manifest.files[ENCODER] == old.manifest.files[ENCODER]
    assert new.manifest.files[FEATURES] == old.manifest.files[FEATURES]
    assert new.manifest.files[CALIBRATION] != old.manifest.files[CALIBRATION]
    expected = np.sort(det.anomaly_scores(det.prepare(cal_images)))
    np.testing.assert_allclose(new.calibration, expected, rtol=1e-9)
    assert new.manifest.calibration.n == 40
    assert new.manifest.calibration.default_alarm_rate == pytest.approx(0.2)
    assert new.manifest.calibration.data == spec
    check = new.manifest.calibration.held_out["sdns"]  # its halves crossed: 40 images
    assert check.n == 40 and check.data == f"{spec} (halves crossed)"
    assert load_bundle(tiny_bundle).hash == old.hash  # the old bundle is left alone

    again = runner.invoke(app, args)
    assert again.exit_code != 0
    assert isinstance(again.exception, BundleError)
    assert "already exists" in str(again.exception)
    assert load_bundle(out).hash == new.hash


def test_calibrate_refuses_too_few_images(tiny_bundle: Path, tmp_path: Path) -> None:
    spec = _npz(tmp_path / "few.npz", np.zeros((5, 16, 16, 1), np.uint8))
    out = tmp_path / "few.sdns"
    result = runner.invoke(
        app, ["calibrate", "--model", str(tiny_bundle), "--data", spec, "--out", str(out)]
    )
    assert isinstance(result.exception, DataError)
    assert not out.exists()


# --- errors ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("extra", "code", "message"),
    [
        (["info", "--model", "{missing}"], 1, "error: no model bundle at"),
        (
            [
                "score",
                "npz:x.npz",
                "--model",
                "{bundle}",
                "--alarm-rate",
                "0.1",
                "--threshold",
                "2",
            ],
            2,
            "mutually exclusive",
        ),
        (
            ["score", "npz:x.npz", "--model", "{bundle}", "--alarm-rate", "1.5"],
            2,
            "--alarm-rate must lie in (0, 1)",
        ),
        (["score", "npz:{missing}", "--model", "{bundle}"], 1, "error: npz:"),
        (["fit", "--data", "animals", "--out", "{missing}", "--k", "ten"], 2, "--k must be"),
        (
            ["fit", "--data", "animals", "--out", "{missing}", "--recipe", "fast"],
            2,
            "unknown recipe",
        ),
        (
            [
                "fit",
                "--data",
                "animals",
                "--out",
                "{missing}",
                "--negatives",
                "none",
                "--neg-source",
                "id",
            ],
            2,
            "needs neg_source 'aux'",
        ),
        (["fit", "--data", "animals", "--out", "{bundle}"], 1, "already exists"),
    ],
    ids=[
        "missing-bundle",
        "both-rules",
        "bad-rate",
        "missing-data",
        "fit-bad-k",
        "fit-unknown-recipe",
        "fit-raw-negatives-from-id",
        "fit-existing-out",
    ],
)
def test_main_prints_one_line_errors_with_exit_codes(
    tiny_bundle: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    extra: list[str],
    code: int,
    message: str,
) -> None:
    fill = {"missing": str(tmp_path / "missing.sdns"), "bundle": str(tiny_bundle)}
    monkeypatch.setattr(sys, "argv", ["sdns-monitor", *(a.format(**fill) for a in extra)])
    with pytest.raises(SystemExit) as exc:
        main()
    assert exc.value.code == code
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: ")
    assert message in err
    assert "Traceback" not in err


def test_console_script_missing_bundle_is_one_line_exit_1(tmp_path: Path) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        [str(CONSOLE_SCRIPT), "info", "--model", str(tmp_path / "nope.sdns")],
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
    )
    assert proc.returncode == 1
    assert proc.stdout == ""
    assert proc.stderr.startswith("error: no model bundle at ")
    assert proc.stderr.count("\n") == 1
    assert "Traceback" not in proc.stderr


def test_unwritable_report_dir_is_one_line_error(
    tiny_bundle: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    argv = [
        "sdns-monitor",
        "eval",
        "--model",
        str(tiny_bundle),
        "--id",
        "animals@0",
        "--ood",
        "animals@1",
        "--report",
        str(blocker / "report"),
    ]
    monkeypatch.setattr(sys, "argv", argv)
    with pytest.raises(SystemExit) as exc:
        main()
    assert exc.value.code == 1
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1
    assert str(blocker) in err


def test_run_without_a_reachable_broker_is_one_line_exit_1(tiny_bundle: Path) -> None:
    """At start-up an unreachable broker is a configuration problem to report, not a
    traceback (outages after start are waited out)."""
    from sdns_monitor.broker import free_port

    env = {**os.environ, "OMP_NUM_THREADS": "1", "SDNS_METRICS_PORT": "off"}
    proc = subprocess.run(
        [
            str(CONSOLE_SCRIPT),
            "run",
            "--topic",
            "frames",
            "--model",
            str(tiny_bundle),
            "--bootstrap-servers",
            f"127.0.0.1:{free_port()}",
        ],
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
    )
    assert proc.returncode == 1
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("error: no Kafka broker answered at 127.0.0.1:")
    assert "Traceback" not in proc.stderr
