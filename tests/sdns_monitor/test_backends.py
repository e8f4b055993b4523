"""Encoder backends: each agrees with eager; a missing one is a clear error; a cached TensorRT
engine is loaded only when it is bound to its bundle and nobody else could have written it."""

from __future__ import annotations

import hashlib
import importlib.util
import json
import logging
import os
import re
import stat
import sys
import types
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn
from typer.testing import CliRunner

from sdns_monitor import backends
from sdns_monitor.backends import TOLERANCE, agreement, engine_path, resolve_backend
from sdns_monitor.bundle import InputSpec
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


# The TensorRT engine cache. torch-tensorrt cannot be installed here, so a stand-in module
# takes its place: `compile` raises Rebuilt (a build was asked for), and engines are real
# exported programs of a tiny module, the format torch_tensorrt.save writes by default.
SPEC = InputSpec(size=4, model_size=4, channels=1, mean=[0.5], std=[0.5])
BUNDLE_HASH = "ab" * 32
CUDA = torch.device("cuda")  # only named: nothing here touches a GPU


class Rebuilt(Exception):
    """The stand-in TensorRT was asked to build an engine."""


@pytest.fixture
def fake_tensorrt(monkeypatch: pytest.MonkeyPatch) -> None:
    trt = types.ModuleType("torch_tensorrt")
    trt.__version__ = "0.0"  # type: ignore[attr-defined]
    trt.Input = lambda **kwargs: kwargs  # type: ignore[attr-defined]

    def compile(*args: object, **kwargs: object) -> nn.Module:
        raise Rebuilt

    trt.compile = compile  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "torch_tensorrt", trt)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "Fake GPU 1")


@pytest.fixture
def no_unpickling(monkeypatch: pytest.MonkeyPatch) -> None:
    def load(*args: object, **kwargs: object) -> None:
        pytest.fail("torch.export.load unpickled an engine that should have been refused")

    monkeypatch.setattr(torch.export, "load", load)


@pytest.fixture
def cache(tmp_path: Path) -> Path:
    root = tmp_path / "cache"
    root.mkdir(mode=0o700)
    root.chmod(0o700)
    return root


def _export(path: Path, scale: float = 1.0) -> bytes:
    """Write a loadable engine stand-in at `path`; `scale` makes a different program."""
    module = nn.Linear(4, 2)
    with torch.no_grad():
        module.weight.fill_(scale)
        module.bias.zero_()
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.export.save(torch.export.export(module, (torch.ones(3, 4),)), str(path))
    return path.read_bytes()


def _sidecar(engine: Path, bundle_hash: str, data: bytes) -> None:
    """The record that binds an engine to its bundle (docs/formats.md, "TensorRT engines")."""
    record = {"bundle_hash": bundle_hash, "engine_sha256": hashlib.sha256(data).hexdigest()}
    Path(f"{engine}.json").write_text(json.dumps(record))


def _run_tensorrt(cache: Path) -> nn.Module:
    return backends._tensorrt(nn.Linear(4, 2), CUDA, SPEC, BUNDLE_HASH, cache, 256)


def test_planted_engine_without_a_sidecar_is_rebuilt_never_loaded(
    cache: Path, fake_tensorrt: None, no_unpickling: None
) -> None:
    _export(engine_path(cache, BUNDLE_HASH, CUDA, SPEC, 256))
    with pytest.raises(Rebuilt):
        _run_tensorrt(cache)


def test_engine_changed_after_caching_is_refused_before_unpickling(
    cache: Path,
    fake_tensorrt: None,
    no_unpickling: None,
    caplog: pytest.LogCaptureFixture,
) -> None:
    path = engine_path(cache, BUNDLE_HASH, CUDA, SPEC, 256)
    _sidecar(path, BUNDLE_HASH, _export(path))
    _export(path, scale=2.0)  # another valid program in its place
    with caplog.at_level(logging.WARNING, logger="sdns_monitor.backends"), pytest.raises(Rebuilt):
        _run_tensorrt(cache)
    assert "SHA-256" in caplog.text and str(path) in caplog.text


def test_engine_cached_for_another_bundle_is_refused(
    cache: Path, fake_tensorrt: None, no_unpickling: None
) -> None:
    # The file name carries only a prefix of the bundle hash; the sidecar carries all of it.
    other = BUNDLE_HASH[:16] + "cd" * 24
    path = engine_path(cache, BUNDLE_HASH, CUDA, SPEC, 256)
    assert path == engine_path(cache, other, CUDA, SPEC, 256)
    _sidecar(path, other, _export(path))
    with pytest.raises(Rebuilt):
        _run_tensorrt(cache)


def test_engine_file_writable_by_others_is_refused(
    cache: Path, fake_tensorrt: None, no_unpickling: None
) -> None:
    path = engine_path(cache, BUNDLE_HASH, CUDA, SPEC, 256)
    _sidecar(path, BUNDLE_HASH, _export(path))
    path.parent.chmod(0o755)
    path.chmod(0o666)
    with pytest.raises(Rebuilt):
        _run_tensorrt(cache)


@pytest.mark.parametrize("where", ["root", "engines", "root-group", "owner"])
def test_cache_dir_writable_by_others_is_refused(
    cache: Path,
    fake_tensorrt: None,
    no_unpickling: None,
    monkeypatch: pytest.MonkeyPatch,
    where: str,
) -> None:
    engines = cache / "tensorrt"
    engines.mkdir(mode=0o700)
    bad = engines if where == "engines" else cache
    if where == "owner":
        if os.geteuid() == 0:
            os.chown(cache, 4242, -1)
        else:  # the directory is ours: pretend we are someone else
            monkeypatch.setattr(os, "geteuid", lambda: os.getuid() + 1)
        message = "belongs to another user"
    else:
        bad.chmod(0o775 if where == "root-group" else 0o777)
        message = re.escape(f"run `chmod go-w {bad}` or choose another --cache-dir")
    with pytest.raises(ConfigError, match=message) as info:
        _run_tensorrt(cache)
    assert str(bad) in str(info.value) and "\n" not in str(info.value)


def test_good_engine_is_loaded_from_the_cache(cache: Path, fake_tensorrt: None) -> None:
    path = engine_path(cache, BUNDLE_HASH, CUDA, SPEC, 256)
    _sidecar(path, BUNDLE_HASH, _export(path, scale=3.0))
    module = _run_tensorrt(cache)  # no Rebuilt: the engine was taken from the cache
    assert torch.equal(module(torch.ones(3, 4)), torch.full((3, 2), 12.0))


def test_a_stored_engine_is_bound_to_its_bundle(cache: Path) -> None:
    path = backends.engine_cache(cache) / "e.ep"
    tmp = path.with_suffix(".tmp1")
    _export(tmp, scale=0.5)
    backends.store_engine(tmp, path, BUNDLE_HASH)
    assert not tmp.exists()
    for written in (path, Path(f"{path}.json")):
        assert stat.S_IMODE(written.stat().st_mode) & 0o022 == 0
    module = backends.load_cached_engine(path, BUNDLE_HASH)
    assert module is not None and torch.equal(module(torch.ones(3, 4)), torch.full((3, 2), 2.0))
    assert backends.load_cached_engine(path, "ef" * 32) is None
    assert backends.load_cached_engine(cache / "tensorrt" / "absent.ep", BUNDLE_HASH) is None


def test_a_refused_engine_is_replaced_by_a_new_build(cache: Path) -> None:
    path = backends.engine_cache(cache) / "e.ep"
    _export(path)  # planted: no sidecar

    def build(tmp: Path) -> nn.Module:
        _export(tmp, scale=4.0)
        return nn.Identity()

    assert isinstance(backends.cached_engine(cache, path, BUNDLE_HASH, build), nn.Identity)
    module = backends.load_cached_engine(path, BUNDLE_HASH)
    assert module is not None and torch.equal(module(torch.ones(3, 4)), torch.full((3, 2), 16.0))
    assert sorted(p.name for p in path.parent.iterdir()) == ["e.ep", "e.ep.json"]
