"""CIFAR-10/100 in the "python version" layout, written here exactly as the real files are."""

from __future__ import annotations

import os
import pickle
from pathlib import Path

import numpy as np
import pytest

from sdns_monitor.data import load_dataset
from sdns_monitor.errors import DataError


def _batch(rng: np.random.Generator, n: int, label_key: bytes, n_classes: int) -> dict:
    batch = {
        b"batch_label": b"testing batch",
        b"data": rng.integers(0, 256, size=(n, 3072), dtype=np.uint8),
        label_key: [int(v) for v in rng.integers(0, n_classes, size=n)],
        b"filenames": [f"img_{i}.png".encode() for i in range(n)],
    }
    if label_key == b"fine_labels":
        batch[b"coarse_labels"] = [v // 5 for v in batch[label_key]]
    return batch


def _write(path: Path, obj: dict, protocol: int = 2) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("wb") as f:
        pickle.dump(obj, f, protocol=protocol)  # the real files are protocol-2 pickles


@pytest.fixture
def cifar10_root(tmp_path: Path) -> tuple[Path, list[dict], dict]:
    rng = np.random.default_rng(0)
    folder = tmp_path / "cifar-10-batches-py"
    train = [_batch(rng, 4 + i, b"labels", 10) for i in range(5)]
    for i, batch in enumerate(train, start=1):
        _write(folder / f"data_batch_{i}", batch)
    test = _batch(rng, 3, b"labels", 10)
    _write(folder / "test_batch", test)
    return tmp_path, train, test


def test_cifar10_train_concatenates_five_batches_with_planes_moved_last(cifar10_root) -> None:
    root, train, _ = cifar10_root
    ds = load_dataset(f"cifar10:{root}:train")
    data = np.concatenate([b[b"data"] for b in train])
    assert ds.images.shape == (4 + 5 + 6 + 7 + 8, 32, 32, 3) and ds.images.dtype == np.uint8
    assert ds.labels is not None and ds.labels.dtype == np.int64
    assert ds.labels.tolist() == [v for b in train for v in b[b"labels"]]
    # Pixel (row r, column c) of channel k is data[n, k * 1024 + r * 32 + c].
    for n, r, c, k in [(0, 0, 0, 0), (3, 5, 7, 1), (29, 31, 31, 2), (10, 0, 31, 2), (11, 31, 0, 1)]:
        assert ds.images[n, r, c, k] == data[n, k * 1024 + r * 32 + c]
    np.testing.assert_array_equal(ds.images[:, :, :, 0].reshape(len(ds), -1), data[:, :1024])


def test_cifar10_test_split_and_root_pointing_at_the_batches_folder(cifar10_root) -> None:
    root, _, test = cifar10_root
    a = load_dataset(f"cifar10:{root}:test")
    b = load_dataset(f"cifar10:{root / 'cifar-10-batches-py'}:test")
    assert a.images.shape == (3, 32, 32, 3)
    np.testing.assert_array_equal(a.images, b.images)
    assert a.labels is not None and a.labels.tolist() == test[b"labels"]


def test_cifar10_class_filter_and_resize(cifar10_root) -> None:
    root, train, _ = cifar10_root
    labels = np.array([v for b in train for v in b[b"labels"]])
    wanted = sorted(set(labels.tolist()))[:2]
    spec = f"cifar10:{root}:train@{wanted[0]},{wanted[1]}"
    ds = load_dataset(spec, size=16, channels=1)
    assert ds.images.shape == (int(np.isin(labels, wanted).sum()), 16, 16, 1)
    assert set(ds.labels.tolist()) == set(wanted) and ds.spec == spec  # type: ignore[union-attr]


@pytest.mark.parametrize("protocol", [2, pickle.HIGHEST_PROTOCOL])
def test_cifar100_uses_fine_labels(tmp_path: Path, protocol: int) -> None:
    rng = np.random.default_rng(1)
    train, test = _batch(rng, 6, b"fine_labels", 100), _batch(rng, 2, b"fine_labels", 100)
    _write(tmp_path / "cifar-100-python" / "train", train, protocol)
    _write(tmp_path / "cifar-100-python" / "test", test, protocol)
    ds = load_dataset(f"cifar100:{tmp_path}:train")
    assert ds.images.shape == (6, 32, 32, 3)
    assert ds.labels is not None and ds.labels.tolist() == train[b"fine_labels"]
    expected = train[b"data"].reshape(6, 3, 32, 32).transpose(0, 2, 3, 1)
    np.testing.assert_array_equal(ds.images, expected)
    assert len(load_dataset(f"cifar100:{tmp_path}/cifar-100-python:test")) == 2


def test_missing_root_names_the_spec_and_the_expected_files(tmp_path: Path) -> None:
    spec = f"cifar10:{tmp_path / 'nowhere'}:test"
    with pytest.raises(DataError, match=r"cifar10:.*nowhere:test: no test_batch under"):
        load_dataset(spec)


def test_a_batch_that_is_not_a_cifar_dict_is_refused(tmp_path: Path) -> None:
    _write(tmp_path / "test", {b"pixels": np.zeros((1, 3072), np.uint8)})
    _write(tmp_path / "train", {b"data": np.zeros((1, 3072), np.uint8), b"fine_labels": [0]})
    with pytest.raises(DataError, match="is not a CIFAR batch"):
        load_dataset(f"cifar100:{tmp_path}:test")


def test_a_tampered_batch_cannot_run_code(tmp_path: Path) -> None:
    marker = tmp_path / "pwned"

    class Payload:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    _write(tmp_path / "test_batch", {b"data": Payload(), b"labels": [0]})
    with pytest.raises(DataError, match=r"test_batch: refusing to unpickle"):
        load_dataset(f"cifar10:{tmp_path}:test")
    assert not marker.exists()


def test_a_truncated_batch_is_a_data_error(tmp_path: Path) -> None:
    _write(tmp_path / "test_batch", {b"data": np.zeros((2, 3072), np.uint8), b"labels": [0, 1]})
    raw = (tmp_path / "test_batch").read_bytes()
    (tmp_path / "test_batch").write_bytes(raw[: len(raw) // 2])
    with pytest.raises(DataError, match="not a readable pickle"):
        load_dataset(f"cifar10:{tmp_path}:test")
