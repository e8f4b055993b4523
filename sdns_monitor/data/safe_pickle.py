"""Unpickle dataset files without letting them run code.

CIFAR batches and the MNIST and animal packages are pickles, and a pickle can call any function
it names (``os.system`` included). This unpickler resolves only the handful of globals that
plain containers of numpy arrays need; anything else is refused before it is called.
"""

from __future__ import annotations

import codecs
import io
import pickle
from collections.abc import Callable
from typing import IO, Any

import numpy as np

from sdns_monitor.errors import DataError

try:  # numpy >= 2 keeps its internals in numpy._core and warns on numpy.core.
    from numpy._core import multiarray as _multiarray
    from numpy._core import numeric as _numeric
except ImportError:  # pragma: no cover - numpy 1.x
    from numpy.core import multiarray as _multiarray  # type: ignore[no-redef]
    from numpy.core import numeric as _numeric  # type: ignore[no-redef]


def _latin1_encode(text: str, encoding: str = "latin1", errors: str = "strict") -> bytes:
    # Protocol-2 pickles of `bytes` go through codecs.encode(str, "latin1"); allow only that
    # codec, so the allowed global cannot be used to reach arbitrary codecs.
    if codecs.lookup(encoding).name != "iso8859-1":
        raise DataError(f"pickle asked for the codec {encoding!r}; only latin1 is allowed")
    return codecs.encode(text, "latin1", errors)


_ALLOWED: dict[tuple[str, str], Callable[..., Any] | type] = {
    ("numpy", "ndarray"): np.ndarray,
    ("numpy", "dtype"): np.dtype,
    ("_codecs", "encode"): _latin1_encode,
    ("codecs", "encode"): _latin1_encode,
}
for _module in ("numpy.core.multiarray", "numpy._core.multiarray"):
    _ALLOWED[(_module, "_reconstruct")] = _multiarray._reconstruct
    _ALLOWED[(_module, "scalar")] = _multiarray.scalar
for _module in ("numpy.core.numeric", "numpy._core.numeric"):
    _ALLOWED[(_module, "_frombuffer")] = _numeric._frombuffer  # type: ignore[attr-defined]


class SafeUnpickler(pickle.Unpickler):
    """An unpickler that only builds numpy arrays, numpy scalars and builtin containers.

    Example:
        >>> with open("data_batch_1", "rb") as f:
        ...     batch = SafeUnpickler(f, encoding="bytes").load()
    """

    def find_class(self, module: str, name: str) -> Any:
        """Return an allowed global; raise DataError for anything else (nothing is imported)."""
        try:
            return _ALLOWED[(module, name)]
        except KeyError:
            raise DataError(
                f"refusing to unpickle {module}.{name}: dataset pickles may only hold numpy "
                "arrays and builtin containers"
            ) from None


def safe_load(file: IO[bytes] | bytes, *, source: str, encoding: str = "ASCII") -> Any:
    """Unpickle `file` (an open binary file or bytes) with `SafeUnpickler`.

    `source` names the file or spec in error messages. `encoding` is passed to the unpickler:
    "latin1" for Python 2 pickles holding numpy arrays, "bytes" to keep Python 2 str keys as bytes
    (the CIFAR layout). Every failure, forbidden global or corrupt data, is a DataError.
    """
    stream = io.BytesIO(file) if isinstance(file, bytes | bytearray) else file
    try:
        return SafeUnpickler(stream, encoding=encoding).load()
    except DataError as exc:
        raise DataError(f"{source}: {exc}") from None
    except Exception as exc:  # corrupt pickles fail in many ways (EOF, KeyError, ValueError...)
        raise DataError(f"{source}: not a readable pickle ({type(exc).__name__}: {exc})") from exc
