"""A restricted unpickler for the CIFAR python release: plain numpy arrays and built-in containers only.

Pickle can call any importable function while loading, so a downloaded pickle is a program. This
unpickler resolves only the few numpy globals that rebuilding an ``ndarray`` needs; every other
global (``os.system``, ``builtins.eval``, ``_codecs.encode``, ...) is refused with DatasetError.
Lists, dicts, tuples, numbers, strings and bytes are built by pickle opcodes and need no globals,
except that pickle protocols 0-2 written by Python 3 store bytes as ``_codecs.encode(text, 'latin1')``;
that one global is admitted through a wrapper that performs only the latin-1 encoding.
"""

from __future__ import annotations

import io
import pickle
from pathlib import Path
from typing import Any

import numpy as np

from .errors import DatasetError

try:  # numpy >= 2
    from numpy._core import multiarray as _multiarray
    from numpy._core import numeric as _numeric
except ImportError:  # numpy 1.x
    from numpy.core import multiarray as _multiarray  # type: ignore[no-redef]
    from numpy.core import numeric as _numeric  # type: ignore[no-redef]

_LATIN1 = {"latin1", "latin-1", "iso-8859-1", "iso8859-1", "l1"}


def _latin1_encode(text: str, encoding: str) -> bytes:
    """Stand-in for ``_codecs.encode`` that only re-creates bytes pickled by protocols 0-2."""
    if encoding.lower() not in _LATIN1:
        raise DatasetError(f"refusing _codecs.encode with encoding {encoding!r}: only latin-1 rebuilds bytes")
    return text.encode("latin-1")


_ALLOWED: dict[tuple[str, str], Any] = {
    ("_codecs", "encode"): _latin1_encode,
    ("numpy", "ndarray"): np.ndarray,
    ("numpy", "dtype"): np.dtype,
    # ndarray.__reduce__ names its rebuild function under the numpy version that wrote the pickle.
    ("numpy.core.multiarray", "_reconstruct"): _multiarray._reconstruct,
    ("numpy._core.multiarray", "_reconstruct"): _multiarray._reconstruct,
    # pickle protocol 5 stores contiguous arrays as a buffer rebuilt by _frombuffer.
    ("numpy.core.numeric", "_frombuffer"): _numeric._frombuffer,  # type: ignore[attr-defined]
    ("numpy._core.numeric", "_frombuffer"): _numeric._frombuffer,  # type: ignore[attr-defined]
}


class RestrictedUnpickler(pickle.Unpickler):
    """``pickle.Unpickler`` that admits only numpy array reconstruction globals."""

    def find_class(self, module: str, name: str) -> Any:
        try:
            return _ALLOWED[(module, name)]
        except KeyError:
            raise DatasetError(
                f"refusing to unpickle global {module}.{name}: only plain numpy arrays, lists, dicts, "
                "strings and bytes are allowed in a dataset pickle; the file is not an official "
                "release file and may be malicious"
            ) from None

    def persistent_load(self, pid: Any) -> Any:
        raise DatasetError(f"refusing pickle persistent id {pid!r}: not allowed in a dataset pickle")


def load_restricted(path: Path) -> Any:
    """Unpickle ``path`` with RestrictedUnpickler.

    Python 2 pickles (the official CIFAR release) are read with ``encoding='latin1'``, the
    encoding numpy documents for Python 2 array pickles; dict keys then come back as ``str``.
    Raises DatasetError if the file is refused, truncated or otherwise not a valid pickle.
    """
    data = path.read_bytes()
    try:
        return RestrictedUnpickler(io.BytesIO(data), encoding="latin1").load()
    except DatasetError as exc:
        raise DatasetError(f"{path}: {exc}") from None
    except Exception as exc:  # a corrupt pickle can fail with almost any exception type
        raise DatasetError(
            f"{path}: not a valid pickle ({type(exc).__name__}: {exc}); delete it and download the "
            "official file again"
        ) from exc
