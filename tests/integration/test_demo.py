"""`sdns-monitor demo` end to end on a small stream (the tiny bundle, so no fitting)."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest


@pytest.mark.integration
def test_demo_streams_scores_and_reports(tiny_bundle: Path, tmp_path: Path) -> None:
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "sdns_monitor.cli",
            "demo",
            "--workdir",
            str(tmp_path),
            "--model",
            str(tiny_bundle),
            "--id-frames",
            "60",
            "--ood-frames",
            "10",
            "--alarm-rate",
            "0.1",
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    out = proc.stdout

    def row(label: str) -> str:
        found = re.search(re.escape(label) + r"\s*│\s*(\S+)", out)
        assert found, f"no row {label!r} in\n{out}"
        return found.group(1)

    # 60 in-distribution + 10 MNIST + 10 animals + 3 x 2 broken-camera frames; 4 corrupt.
    assert row("frames scored") == "86"
    assert row("dead letters (corrupt messages)") == "4"
    precision = row("flagged frames: precision / recall")
    assert 0 < float(precision) <= 1
    report = tmp_path / "demo-report.html"
    assert f"report with the flagged frames: {report}" in out
    page = report.read_text()
    assert "<h1>sdns-monitor demo: model tiny</h1>" in page
    assert page.count("data:image/png;base64,") >= 6  # noise is flagged even by a random encoder
