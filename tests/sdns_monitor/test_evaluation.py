"""Tests of sdns_monitor.evaluation: OOD metrics and the ROC / histogram plots."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from sdns_monitor.evaluation import OodMetrics, ood_metrics, plot_histogram, plot_roc

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def test_perfect_separation() -> None:
    m = ood_metrics(np.array([0.0, 1.0, 2.0]), np.array([10.0, 11.0]))
    assert m == OodMetrics(auroc=1.0, fpr95=0.0, aupr=1.0, n_id=3, n_ood=2)


def test_reversed_scores_are_worst_case() -> None:
    m = ood_metrics(np.array([10.0, 11.0]), np.array([0.0, 1.0, 2.0]))
    assert m.auroc == 0.0
    assert m.fpr95 == 1.0


def test_identical_distributions_are_at_chance() -> None:
    rng = np.random.default_rng(0)
    m = ood_metrics(rng.normal(size=20_000), rng.normal(size=20_000))
    assert m.auroc == pytest.approx(0.5, abs=0.015)
    # At chance, detecting 95% of OOD flags about 95% of ID.
    assert m.fpr95 == pytest.approx(0.95, abs=0.015)
    assert m.aupr == pytest.approx(0.5, abs=0.015)


def test_small_example_by_hand() -> None:
    # Pairs (ood > id): 3.5 beats 3 ids, 4.5 beats 4, 6 beats 5 -> 12 of 15 pairs.
    # 2 of 3 OOD is below 95%, so all 3 must be detected: threshold 3.5 flags ids 4 and 5.
    # Ranked: 6(O) 5(I) 4.5(O) 4(I) 3.5(O) ... -> AP = (1/1 + 2/3 + 3/5) / 3.
    m = ood_metrics(np.array([1.0, 2.0, 3.0, 4.0, 5.0]), np.array([3.5, 4.5, 6.0]))
    assert m.auroc == pytest.approx(12 / 15)
    assert m.fpr95 == pytest.approx(2 / 5)
    assert m.aupr == pytest.approx((1 + 2 / 3 + 3 / 5) / 3)
    assert (m.n_id, m.n_ood) == (5, 3)


def test_fpr95_at_exactly_95_percent_counts_ties_as_flagged() -> None:
    # 19 of 20 OOD scores (2..20) are >= 2, exactly 95%; ids >= 2 are 2, 2.5 and 30.
    # AUROC by pairs: id 0 -> 20, 1.5 -> 19, 2 -> 18 + tie 0.5, 2.5 -> 18, 30 -> 0; / 100.
    ids = np.array([0.0, 1.5, 2.0, 2.5, 30.0])
    oods = np.arange(1.0, 21.0)
    m = ood_metrics(ids, oods)
    assert m.fpr95 == pytest.approx(3 / 5)
    assert m.auroc == pytest.approx(75.5 / 100)


def test_metrics_are_frozen() -> None:
    m = ood_metrics(np.array([0.0]), np.array([1.0]))
    with pytest.raises(dataclasses.FrozenInstanceError):
        m.auroc = 0.0  # type: ignore[misc]


@pytest.mark.parametrize(
    ("ids", "oods", "message"),
    [
        ([], [1.0], "id_scores is empty"),
        ([1.0], [], "ood_scores is empty"),
        ([np.nan, 1.0], [1.0], "id_scores holds 1 NaN"),
        ([1.0], [np.inf, -np.inf], "ood_scores holds 2 NaN or infinite"),
    ],
)
def test_bad_scores_raise_value_error(ids: list[float], oods: list[float], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        ood_metrics(np.array(ids), np.array(oods))


def _assert_png(path: Path) -> tuple[int, int]:
    data = path.read_bytes()
    assert data[:8] == PNG_MAGIC
    assert len(data) > 5_000  # axes, curves and text, not a blank canvas
    with Image.open(path) as image:
        return image.size


def test_plot_roc_writes_a_png(tmp_path: Path) -> None:
    rng = np.random.default_rng(1)
    curves = {
        "good": (rng.normal(0, 1, 500), rng.normal(3, 1, 500)),
        "chance": (rng.normal(0, 1, 500), rng.normal(0, 1, 500)),
    }
    path = tmp_path / "reports" / "roc.png"
    plot_roc(curves, path, "ROC")
    width, height = _assert_png(path)
    assert width > 300 and height > 300


def test_plot_roc_refuses_no_curves_and_bad_scores(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="at least one curve"):
        plot_roc({}, tmp_path / "roc.png", "ROC")
    with pytest.raises(ValueError, match="bad: id_scores holds"):
        plot_roc({"bad": (np.array([np.nan]), np.array([1.0]))}, tmp_path / "roc.png", "ROC")
    assert not (tmp_path / "roc.png").exists()


def test_plot_histogram_writes_a_png(tmp_path: Path) -> None:
    rng = np.random.default_rng(2)
    path = tmp_path / "hist.png"
    plot_histogram(rng.normal(0, 1, 300), rng.normal(2, 1, 300), path, "scores", threshold=1.0)
    _assert_png(path)


def test_plot_histogram_handles_constant_scores(tmp_path: Path) -> None:
    path = tmp_path / "hist.png"
    plot_histogram(np.zeros(10), np.zeros(5), path, "degenerate")
    _assert_png(path)


def test_plot_histogram_refuses_bad_input(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="id_scores is empty"):
        plot_histogram(np.array([]), np.array([1.0]), tmp_path / "h.png", "x")
    with pytest.raises(ValueError, match="threshold must be finite"):
        plot_histogram(np.array([0.0]), np.array([1.0]), tmp_path / "h.png", "x", threshold=np.nan)
