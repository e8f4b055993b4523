"""The IDX reader and the Fashion-MNIST directory override, on files written here."""

from __future__ import annotations

import gzip
import struct
from pathlib import Path

import numpy as np
import pytest

from sdns_monitor.data import load_dataset
from sdns_monitor.data.idx import parse_idx
from sdns_monitor.errors import DataError


def _idx(array: np.ndarray, type_code: int) -> bytes:
    header = struct.pack(">BBBB", 0, 0, type_code, array.ndim)
    header += struct.pack(f">{array.ndim}I", *array.shape)
    return header + array.astype(array.dtype.newbyteorder(">")).tobytes()


def test_parse_idx_reads_big_endian_headers_and_data() -> None:
    images = np.arange(2 * 3 * 4, dtype=np.uint8).reshape(2, 3, 4)
    np.testing.assert_array_equal(parse_idx(_idx(images, 0x08)), images)
    ints = np.array([[1, -2], [70000, 3]], dtype=np.int32)
    out = parse_idx(_idx(ints, 0x0C))
    np.testing.assert_array_equal(out, ints)
    assert out.dtype == np.int32 and out.dtype.isnative


@pytest.mark.parametrize(
    ("data", "match"),
    [
        (b"\x00\x00\x07\x01", "bad magic number 00000701"),
        (b"\x1f\x8b\x08\x00", "bad magic number"),
        (b"\x00\x00\x08\x02\x00\x00", "header is truncated"),
        (_idx(np.zeros((2, 2), np.uint8), 0x08)[:-1], "header says"),
    ],
)
def test_parse_idx_rejects_malformed_files(data: bytes, match: str) -> None:
    with pytest.raises(DataError, match=match):
        parse_idx(data)


def test_fashion_dir_can_be_overridden(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    images = np.random.default_rng(0).integers(0, 256, size=(5, 28, 28), dtype=np.uint8)
    labels = np.array([9, 0, 0, 3, 9], dtype=np.uint8)
    with gzip.open(tmp_path / "t10k-images-idx3-ubyte.gz", "wb") as f:
        f.write(_idx(images, 0x08))
    with gzip.open(tmp_path / "t10k-labels-idx1-ubyte.gz", "wb") as f:
        f.write(_idx(labels, 0x08))
    monkeypatch.setenv("SDNS_FASHION_MNIST_DIR", str(tmp_path))
    ds = load_dataset("fashion-mnist:test@9")
    np.testing.assert_array_equal(ds.images[..., 0], images[[0, 4]])
    assert ds.labels is not None and ds.labels.tolist() == [9, 9]
    with pytest.raises(
        DataError, match=r"^fashion-mnist:train: .*apt-get install dataset-fashion-mnist"
    ):
        load_dataset("fashion-mnist:train")  # no train files in tmp_path
