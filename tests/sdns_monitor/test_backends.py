"""Encoder backends: each agrees with eager; a missing one is a clear error."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from sdns_monitor.backends import TOLERANCE, agreement, resolve_backend
from sdns_monitor.cli import app
from sdns_monitor.detector import Detector
from sdns_monitor.errors import ConfigError, MissingExtraError

CPU = torch.device("cpu")


def test_auto_is_eager_on_a_cpu_and_names_are_checked() -> None:
    assert resolve_backend("auto", CPU) == "eager"
    assert resolve_backend("compile", CPU) == "compile"
    with pytest.raises(ConfigError, match="unknown backend 'onnx'"):
        resolve_backend("onnx", CPU)


def test_compile_agrees_with_eager(tiny_bundle: Path, fashion_test: np.ndarray) -> None:
    eager = Detector.load(tiny_bundle, device="cpu")
    compiled = Detector.load(tiny_bundle, device="cpu", backend="compile")
    assert (eager.backend, compiled.backend) == ("eager", "compile")
    frames = fashion_test[2000:2100]
    a, b = eager.features(frames), compiled.features(frames[:37])  # another batch size too
    assert agreement(a[:37], b) >= TOLERANCE["compile"]
    assert np.allclose(eager.anomaly_scores(frames), compiled.anomaly_scores(frames), atol=1e-3)


@pytest.mark.skipif(
    importlib.util.find_spec("torch_tensorrt") is not None, reason="torch-tensorrt is installed"
)
def test_tensorrt_without_its_extra_is_a_clear_error(tiny_bundle: Path) -> None:
    with pytest.raises(MissingExtraError, match=r"pip install 'sdns-monitor\[tensorrt\]'"):
        Detector.load(tiny_bundle, device="cpu", backend="tensorrt")
    result = CliRunner().invoke(app, ["export", "--model", str(tiny_bundle), "--device", "cpu"])
    assert result.exit_code != 0 and isinstance(result.exception, MissingExtraError)


def test_export_checks_the_backend_against_eager(tiny_bundle: Path) -> None:
    result = CliRunner().invoke(
        app, ["export", "--model", str(tiny_bundle), "--backend", "eager", "--device", "cpu"]
    )
    assert result.exit_code == 0, result.output
    assert "eager encoder ready on cpu; cosine vs eager 1.000000" in result.output
