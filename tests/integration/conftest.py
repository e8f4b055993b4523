"""The quick model, fitted once per session by the CLI on a 12,000-image Fashion-MNIST subset
(about 2 minutes): what end-to-end and camera-goal tests run on."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from sdns_monitor.data import load_dataset


@pytest.fixture(scope="session")
def fmnist_subset(tmp_path_factory: pytest.TempPathFactory) -> str:
    data = load_dataset("fashion-mnist:train")
    pick = np.random.default_rng(0).choice(len(data), 12000, replace=False)
    path = tmp_path_factory.mktemp("data") / "fmnist-12k.npz"
    np.savez(path, images=data.images[pick], labels=data.labels[pick])
    return f"npz:{path}"


@pytest.fixture(scope="session")
def quick_bundle(fmnist_subset: str, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("models") / "fmnist.sdns"
    cmd = [sys.executable, "-m", "sdns_monitor.cli", "fit", "--data", fmnist_subset]
    cmd += ["--out", str(out), "--recipe", "quick", "--quiet"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=900, check=False)
    assert proc.returncode == 0, proc.stderr
    assert f"wrote {out}" in proc.stdout
    return out
