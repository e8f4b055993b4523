"""End to end on real data: fit the quick recipe on Fashion-MNIST, evaluate against MNIST."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from sdns_monitor.bundle import load_bundle
from sdns_monitor.data import load_dataset

CLI = [sys.executable, "-m", "sdns_monitor.cli"]
# The quick recipe (under 3 minutes) measured AUROC 0.82 against animal silhouettes on the full
# Fashion-MNIST training set; the bar leaves room for the 12k subset, seeds and machines.
# Against MNIST the quick recipe is not reliable (0.62 on the full set, below 0.5 on this
# subset): its features are mid-way between the random encoder's low-level ones and the
# semantic ones the default recipe reaches (0.91), so MNIST is checked on the default recipe
# in test_default_recipe_detects_mnist (slow).
ANIMALS_AUROC_BAR = 0.7
MNIST_AUROC_BAR_DEFAULT = 0.85


def run(*args: str, timeout: float = 600) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*CLI, *args], capture_output=True, text=True, timeout=timeout, check=False
    )


@pytest.mark.integration
def test_quick_fit_detects_animal_silhouettes(quick_bundle: Path) -> None:
    proc = run(
        "eval",
        "--model",
        str(quick_bundle),
        "--id",
        "fashion-mnist:test",
        "--ood",
        "animals",
        "--ood",
        "mnist:test",
        "--limit",
        "3000",
        "--json",
    )
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout)
    assert result["id"] == "fashion-mnist:test"
    animals, mnist = result["results"]
    assert (animals["ood"], mnist["ood"]) == ("animals", "mnist:test")
    assert animals["auroc"] > ANIMALS_AUROC_BAR, animals
    for row in result["results"]:
        assert 0.0 <= row["fpr95"] <= 1.0 and 0.0 <= row["aupr"] <= 1.0


@pytest.mark.slow
def test_default_recipe_detects_mnist(tmp_path: Path) -> None:
    """The default recipe on the full Fashion-MNIST training set (about 20 minutes)."""
    out = tmp_path / "default.sdns"
    proc = run("fit", "--data", "fashion-mnist:train", "--out", str(out), "--quiet", timeout=3600)
    assert proc.returncode == 0, proc.stderr
    proc = run(
        "eval", "--model", str(out), "--id", "fashion-mnist:test", "--ood", "mnist:test", "--json"
    )
    assert proc.returncode == 0, proc.stderr
    (row,) = json.loads(proc.stdout)["results"]
    assert row["auroc"] > MNIST_AUROC_BAR_DEFAULT, row


@pytest.mark.integration
def test_quick_bundle_records_its_training(quick_bundle: Path, fmnist_subset: str) -> None:
    bundle = load_bundle(quick_bundle)
    m = bundle.manifest
    assert m.training.data == fmnist_subset
    assert m.training.config["recipe"] == "quick"
    assert m.training.aux == ["photos", "textures"]
    n_cal = m.calibration.n
    # Calibration images are held out of the reference bank and of training.
    assert n_cal == round(0.1 * 12000)
    assert m.training.n_train + m.training.n_validation + n_cal == 12000
    assert m.score.n_reference == bundle.features.shape[0] <= m.training.n_train
    curves = m.training.curves
    assert (
        len(curves["step_loss"])
        == m.training.config["steps_per_epoch"] * m.training.config["epochs"]
    )
    assert all(np.isfinite(curves["step_loss"]))
    # Features are unit-norm teacher features.
    np.testing.assert_allclose(np.linalg.norm(bundle.features, axis=1), 1.0, atol=1e-4)


@pytest.mark.integration
def test_score_flags_at_the_chosen_alarm_rate(quick_bundle: Path, tmp_path: Path) -> None:
    """Held-out in-distribution images are flagged at about the alarm rate (conformal
    guarantee); out-of-distribution ones far more often."""
    rng = np.random.default_rng(1)
    fm = load_dataset("fashion-mnist:test").images
    animals = load_dataset("animals").images
    id_path, ood_path = tmp_path / "id.npz", tmp_path / "ood.npz"
    np.savez(id_path, images=fm[rng.choice(len(fm), 2000, replace=False)])
    np.savez(ood_path, images=animals[rng.choice(len(animals), 500, replace=False)])
    rates = {}
    for name, path in (("id", id_path), ("ood", ood_path)):
        proc = run("score", f"npz:{path}", "--model", str(quick_bundle), "--alarm-rate", "0.1")
        assert proc.returncode == 0, proc.stderr
        lines = [json.loads(line) for line in proc.stdout.splitlines()]
        assert [r["index"] for r in lines] == list(range(len(lines)))
        assert set(lines[0]) == {"index", "source", "score", "p_value", "flagged"}
        assert all(r["flagged"] == (r["p_value"] < 0.1) for r in lines)
        rates[name] = np.mean([r["flagged"] for r in lines])
    # Binomial(2000, 0.1) has sd 0.0067; the test split is a slightly different sample than
    # the calibration split of the training file, so allow a wide band.
    assert 0.05 < rates["id"] < 0.16, rates
    assert rates["ood"] > 2 * rates["id"], rates


@pytest.mark.integration
def test_two_process_training_with_torchrun(fmnist_subset: str, tmp_path: Path) -> None:
    """DistributedDataParallel on 2 CPU processes (gloo) writes one bundle from rank 0."""
    out = tmp_path / "ddp.sdns"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            "--nproc_per_node=2",
            "-m",
            "sdns_monitor.cli",
            "fit",
            "--data",
            fmnist_subset,
            "--out",
            str(out),
            "--recipe",
            "quick",
            "--steps-per-epoch",
            "6",
            "--batch-size",
            "32",
            "--quiet",
        ],
        capture_output=True,
        text=True,
        timeout=600,
        env=env,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    bundle = load_bundle(out)
    assert bundle.manifest.training.metrics["processes"] == 2
    assert len(bundle.manifest.training.curves["step_loss"]) == 6
