"""The restricted unpickler builds numpy containers and refuses anything that could run code."""

from __future__ import annotations

import os
import pickle
from pathlib import Path

import numpy as np
import pytest

from sdns_monitor.data.safe_pickle import safe_load
from sdns_monitor.errors import DataError


class _RunsCommand:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[object, tuple[str]]:
        return (os.system, (f"touch {self.marker}",))


@pytest.mark.parametrize("protocol", [2, 4, 5])
def test_numpy_containers_round_trip(protocol: int) -> None:
    obj = {
        b"data": np.arange(12, dtype=np.uint8).reshape(3, 4),
        b"labels": [1, 2, 3],
        b"name": b"batch",
        "scalar": np.int64(7),
        "floats": np.linspace(0, 1, 5, dtype=np.float32),
    }
    out = safe_load(pickle.dumps(obj, protocol=protocol), source="t", encoding="bytes")
    np.testing.assert_array_equal(out[b"data"], obj[b"data"])
    np.testing.assert_array_equal(out["floats"], obj["floats"])
    assert out[b"labels"] == [1, 2, 3] and out[b"name"] == b"batch" and out["scalar"] == 7


def test_a_pickle_calling_os_system_is_refused_and_nothing_runs(tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    payload = pickle.dumps({b"data": _RunsCommand(marker)})
    assert b"system" in payload
    with pytest.raises(DataError, match=r"refusing to unpickle (posix|os|nt)\.system"):
        safe_load(payload, source="evil.pkl")
    assert not marker.exists()
    # The same payload through plain pickle would have run the command: the test is not vacuous.
    pickle.loads(payload)
    assert marker.exists()


@pytest.mark.parametrize("target", ["builtins eval", "builtins getattr", "subprocess Popen"])
def test_other_dangerous_globals_are_refused(target: str) -> None:
    module, name = target.split()
    payload = b"\x80\x02c" + f"{module}\n{name}\n".encode() + b"X\x01\x00\x00\x001\x85R."
    with pytest.raises(DataError, match=f"refusing to unpickle {module}.{name}"):
        safe_load(payload, source="evil.pkl")


def test_codecs_encode_is_limited_to_latin1() -> None:
    payload = b"\x80\x02c_codecs\nencode\nX\x01\x00\x00\x00aX\x06\x00\x00\x00rot_13\x86R."
    with pytest.raises(DataError, match="only latin1"):
        safe_load(payload, source="odd.pkl")


def test_corrupt_data_is_a_data_error_naming_the_source() -> None:
    with pytest.raises(DataError, match=r"broken\.pkl: not a readable pickle"):
        safe_load(b"\x80\x04\x95garbage", source="broken.pkl")
