"""`fit --resume` after the process is killed repeats the uninterrupted run (slow: two fits)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from sdns_monitor.bundle import load_bundle
from sdns_monitor.data import load_dataset

ARGS = [
    "--recipe",
    "quick",
    "--epochs",
    "3",
    "--steps-per-epoch",
    "8",
    "--batch-size",
    "32",
    "--k",
    "50",
    "--quiet",
]


def _fit(data: str, out: Path, *extra: str) -> subprocess.Popen[bytes]:
    cmd = [sys.executable, "-m", "sdns_monitor.cli", "fit", "--data", data, "--out", str(out)]
    return subprocess.Popen([*cmd, *ARGS, *extra], stderr=subprocess.PIPE)


@pytest.mark.slow
def test_killed_fit_resumes_to_the_same_loss_curve(tmp_path: Path) -> None:
    images = load_dataset("fashion-mnist:train").images[:3000]
    np.savez(tmp_path / "ref.npz", images=images)
    data = f"npz:{tmp_path / 'ref.npz'}"

    full = _fit(data, tmp_path / "full.sdns")
    assert full.wait(timeout=900) == 0, full.stderr.read() if full.stderr else ""

    out = tmp_path / "killed.sdns"
    ckpt = out.with_name(out.name + ".ckpt") / "checkpoint.pt"
    proc = _fit(data, out)
    deadline = time.monotonic() + 900
    while not ckpt.exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    assert proc.poll() is None, "fit finished before it could be killed"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not out.exists()

    resumed = _fit(data, out, "--resume")
    assert resumed.wait(timeout=900) == 0, resumed.stderr.read() if resumed.stderr else ""
    a = load_bundle(tmp_path / "full.sdns").manifest.training.curves["step_loss"]
    b = load_bundle(out).manifest.training.curves["step_loss"]
    assert len(a) == len(b) == 24
    np.testing.assert_allclose(b, a, rtol=1e-5)
    assert not ckpt.parent.exists()  # removed once the bundle is written
