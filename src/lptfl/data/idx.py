"""Strict reader for IDX files of unsigned bytes (the MNIST / Fashion-MNIST file format).

Layout: a big-endian 4-byte magic ``0x00 0x00 <dtype> <ndim>`` (dtype 0x08 = unsigned byte), then
``ndim`` big-endian uint32 sizes, then exactly ``prod(sizes)`` bytes of data in C order.
"""

from __future__ import annotations

import gzip
import math
import zlib
from pathlib import Path

import numpy as np

from .errors import DatasetError

UBYTE = 0x08
_HINT = "delete it and download the official file again"


def read_file_bytes(path: Path) -> bytes:
    """Return the content of ``path``, gunzipped when its name ends in ``.gz``."""
    if path.suffix != ".gz":
        return path.read_bytes()
    try:
        return gzip.decompress(path.read_bytes())
    except (gzip.BadGzipFile, EOFError, zlib.error) as exc:
        raise DatasetError(f"{path}: not a valid gzip file ({exc}); {_HINT}") from exc


def parse_idx(data: bytes, *, ndim: int, source: str) -> np.ndarray:
    """Parse IDX bytes holding unsigned bytes with ``ndim`` dimensions.

    Returns a read-only uint8 array with the shape stated in the header. ``source`` names the file
    in error messages. Raises DatasetError on a wrong magic number, a truncated header, or a byte
    length that differs from header + prod(sizes).
    """
    expected_magic = (UBYTE << 8) | ndim
    if len(data) < 4:
        raise DatasetError(f"{source}: {len(data)} bytes, too short for the 4-byte IDX magic; {_HINT}")
    magic = int.from_bytes(data[:4], "big")
    if magic != expected_magic:
        raise DatasetError(
            f"{source}: IDX magic 0x{magic:08X}, expected 0x{expected_magic:08X} (unsigned bytes, "
            f"{ndim} dimension(s)); this is not the expected IDX file or it is corrupt"
        )
    header = 4 + 4 * ndim
    if len(data) < header:
        raise DatasetError(f"{source}: {len(data)} bytes, shorter than its {header}-byte IDX header; {_HINT}")
    sizes = tuple(int(s) for s in np.frombuffer(data, dtype=">u4", count=ndim, offset=4))
    expected_len = header + math.prod(sizes)
    if len(data) != expected_len:
        problem = "truncated" if len(data) < expected_len else "followed by extra bytes"
        raise DatasetError(
            f"{source}: {len(data)} bytes, expected {expected_len} (header {header} + "
            f"{'x'.join(map(str, sizes))} values); the file is {problem}; {_HINT}"
        )
    return np.frombuffer(data, dtype=np.uint8, offset=header).reshape(sizes)


def read_idx(path: Path, *, ndim: int) -> np.ndarray:
    """Read an IDX file (raw or ``.gz``) of unsigned bytes with ``ndim`` dimensions; see parse_idx."""
    return parse_idx(read_file_bytes(path), ndim=ndim, source=str(path))
