"""Shared fixtures: a real (untrained) model bundle built from real Fashion-MNIST images."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch

from sdns_monitor.broker import Broker, start_broker
from sdns_monitor.bundle import (
    InputSpec,
    Manifest,
    ScoreSpec,
    TrainingRecord,
    calibration_summary,
    write_bundle,
)
from sdns_monitor.data import load_dataset
from sdns_monitor.detector import Detector
from sdns_monitor.features import extract_features
from sdns_monitor.index import ReferenceIndex
from sdns_monitor.networks import BackboneConfig, create_backbone
from sdns_monitor.preprocess import prepare_uint8

TINY_SIZE = 16
TINY_K = 50
TINY_ALARM_RATE = 0.1


@pytest.fixture(autouse=True)
def _one_torch_thread(request: pytest.FixtureRequest) -> Iterator[None]:
    """Unit tests run tiny networks on one thread: on a few shared cores, several threads spend
    most of their time waiting for each other (measured 10-15x slower). Integration tests keep
    the machine's setting."""
    if "integration" in Path(str(request.node.path)).parts:
        yield
        return
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def fashion_test() -> np.ndarray:
    """Fashion-MNIST test images at 16 px, 1 channel (uint8 N x 16 x 16 x 1). Shared by the
    whole session: never write to it."""
    images = prepare_uint8(load_dataset("fashion-mnist:test").images[:3000], TINY_SIZE, 1)
    return images


@pytest.fixture(scope="session")
def tiny_bundle(tmp_path_factory: pytest.TempPathFactory, fashion_test: np.ndarray) -> Path:
    """A verified bundle of a randomly initialised cnn-small (width 4, 16 px): reference bank =
    Fashion-MNIST test images 0-299, calibration scores = images 300-599. Never modify it:
    copy it first (tests that tamper with a bundle use `shutil.copytree`)."""
    torch.manual_seed(0)
    backbone = BackboneConfig(name="cnn-small", in_channels=1, image_size=TINY_SIZE, width=4)
    encoder = create_backbone(backbone).eval()
    reference, calibration = fashion_test[:300], fashion_test[300:600]
    mean = [float(reference.mean() / 255.0)]
    std = [float(reference.std() / 255.0)]
    spec = InputSpec(size=TINY_SIZE, model_size=TINY_SIZE, channels=1, mean=mean, std=std)
    cpu = torch.device("cpu")
    features = extract_features(encoder, reference, spec, cpu).numpy()
    index = ReferenceIndex(features, "Flat")
    cal_scores = index.kernel_scores(
        extract_features(encoder, calibration, spec, cpu), TINY_K, 0.04
    )
    manifest = Manifest(
        name="tiny",
        backbone=backbone,
        input=spec,
        feature_dim=encoder.feature_dim,
        score=ScoreSpec(temperature=0.04, k=TINY_K, index_factory="Flat", n_reference=300),
        calibration=calibration_summary(cal_scores, TINY_ALARM_RATE, "fashion-mnist:test[300:600]"),
        training=TrainingRecord(data="fashion-mnist:test[:300]", n_train=300),
    )
    path = tmp_path_factory.mktemp("bundles") / "tiny.sdns"
    return write_bundle(path, manifest, encoder.state_dict(), features, cal_scores)


@pytest.fixture(scope="session")
def kafka_broker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Broker]:
    """A real Kafka-protocol broker (Tansu, in-memory storage) on a free loopback port.

    Tests create their own topics with unique names; the broker is stopped by PID at the end.
    """
    log = tmp_path_factory.mktemp("broker") / "tansu.log"
    broker = start_broker(log=log)
    try:
        yield broker
    finally:
        broker.stop()


@pytest.fixture(scope="session")
def det(tiny_bundle: Path) -> Detector:
    """A Detector on `tiny_bundle`, on the CPU."""
    return Detector.load(tiny_bundle, device="cpu")
