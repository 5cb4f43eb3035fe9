"""CIFAR-10 and CIFAR-100: the binary release (preferred) and the python (pickle) release.

Binary: ``cifar-10-batches-bin/{data_batch_1..5,test_batch}.bin``, records of 1 label byte + 3072
pixel bytes; ``cifar-100-binary/{train,test}.bin``, records of 2 label bytes (coarse, fine) + 3072.
Python: ``cifar-10-batches-py/{data_batch_1..5,test_batch}`` and ``cifar-100-python/{train,test}``,
pickled dicts with ``data`` (N x 3072 uint8) and ``labels`` / ``fine_labels``.
Pixels are stored as three 32x32 planes (R, G, B), row-major, so a record reshapes to (3, 32, 32).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .errors import DatasetError, MissingFilesError
from .safe_pickle import load_restricted

logger = logging.getLogger(__name__)

PIXELS = 3 * 32 * 32
# Records in each (train file, test file) of the official releases, binary and python alike.
RECORDS_PER_FILE = {10: (10_000, 10_000), 100: (50_000, 10_000)}
_CIFAR10_BATCHES = tuple(f"data_batch_{i}" for i in range(1, 6))


@dataclass(frozen=True)
class _Release:
    """One on-disk release: its folder, its train and test files, and the reader of one file."""

    folder: str
    train: tuple[str, ...]
    test: tuple[str, ...]
    read: Callable[[Path, int], tuple[np.ndarray, np.ndarray]]


def read_binary_batch(path: Path, num_classes: int) -> tuple[np.ndarray, np.ndarray]:
    """Read one binary-release file; ``num_classes`` 10 = CIFAR-10 records, 100 = CIFAR-100 records.

    Returns images uint8 (N, 3, 32, 32) and labels int64 (N,) (the fine label for CIFAR-100).
    """
    label_bytes = 1 if num_classes == 10 else 2
    record = label_bytes + PIXELS
    data = path.read_bytes()
    if not data or len(data) % record:
        raise DatasetError(
            f"{path}: {len(data)} bytes is not a positive multiple of the {record}-byte record "
            f"({label_bytes} label byte(s) + {PIXELS} pixels); the file is truncated or not a "
            "CIFAR binary file; delete it and download the official release again"
        )
    records = np.frombuffer(data, dtype=np.uint8).reshape(-1, record)
    labels = records[:, label_bytes - 1].astype(np.int64)
    _check_labels(labels, num_classes, path)
    return records[:, label_bytes:].reshape(-1, 3, 32, 32), labels


def read_python_batch(path: Path, num_classes: int) -> tuple[np.ndarray, np.ndarray]:
    """Read one python-release file through the restricted unpickler; same return as read_binary_batch."""
    batch = load_restricted(path)
    if not isinstance(batch, dict):
        raise DatasetError(f"{path}: unpickled a {type(batch).__name__}, expected a dict of a CIFAR batch")
    batch = {k.decode("latin1") if isinstance(k, bytes) else k: v for k, v in batch.items()}
    label_key = "labels" if num_classes == 10 else "fine_labels"
    missing = {"data", label_key} - batch.keys()
    if missing:
        raise DatasetError(f"{path}: CIFAR batch lacks key(s) {sorted(missing)}; found {sorted(map(str, batch))}")
    images = batch["data"]
    if not isinstance(images, np.ndarray):
        raise DatasetError(f"{path}: 'data' is a {type(images).__name__}, expected a uint8 array (N, {PIXELS})")
    if images.dtype != np.uint8 or images.ndim != 2 or images.shape[1] != PIXELS:
        raise DatasetError(
            f"{path}: 'data' is a {images.dtype} array of shape {images.shape}, expected a uint8 array "
            f"of shape (N, {PIXELS})"
        )
    try:
        labels = np.asarray(batch[label_key], dtype=np.int64)
    except (TypeError, ValueError) as exc:
        raise DatasetError(f"{path}: {label_key!r} is not a list of integers ({exc})") from exc
    if labels.shape != (images.shape[0],):
        raise DatasetError(
            f"{path}: {label_key!r} has shape {labels.shape}, expected ({images.shape[0]},) to match 'data'"
        )
    _check_labels(labels, num_classes, path)
    return images.reshape(-1, 3, 32, 32), labels


def _check_labels(labels: np.ndarray, num_classes: int, path: Path) -> None:
    if labels.size and (labels.min() < 0 or labels.max() >= num_classes):
        bad = labels[(labels < 0) | (labels >= num_classes)][0]
        raise DatasetError(f"{path}: label {bad} out of range, expected 0..{num_classes - 1}")


RELEASES: dict[int, tuple[_Release, ...]] = {
    10: (
        _Release("cifar-10-batches-bin", tuple(f"{b}.bin" for b in _CIFAR10_BATCHES), ("test_batch.bin",),
                 read_binary_batch),
        _Release("cifar-10-batches-py", _CIFAR10_BATCHES, ("test_batch",), read_python_batch),
    ),
    100: (
        _Release("cifar-100-binary", ("train.bin",), ("test.bin",), read_binary_batch),
        _Release("cifar-100-python", ("train",), ("test",), read_python_batch),
    ),
}


def _missing(root: Path, release: _Release) -> list[str]:
    return [name for name in release.train + release.test if not (root / release.folder / name).is_file()]


def load_cifar(root: Path, num_classes: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Load CIFAR-10 (``num_classes=10``) or CIFAR-100 (``num_classes=100``) from ``root``.

    Uses the binary release when complete, else the python release (with a warning if the binary
    release's folder exists). Returns ``(train_x, train_y, test_x, test_y)``: images uint8
    (N, 3, 32, 32), labels int64 (N,). Raises MissingFilesError (naming the binary release) when
    neither release is complete, DatasetError for a file of the wrong record count (RECORDS_PER_FILE).
    """
    if num_classes not in RELEASES:
        raise ValueError(f"num_classes must be 10 (CIFAR-10) or 100 (CIFAR-100), got {num_classes}")
    preferred = RELEASES[num_classes][0]
    complete = [r for r in RELEASES[num_classes] if not _missing(root, r)]
    if not complete:
        raise MissingFilesError(_missing(root, preferred)[0], root / preferred.folder)
    release = complete[0]
    if release is not preferred and (root / preferred.folder).is_dir():
        logger.warning("%s lacks %s; loading the python release %s instead", root / preferred.folder,
                       ", ".join(_missing(root, preferred)), root / release.folder)
    folder = root / release.folder
    splits = []
    for names, expected in zip((release.train, release.test), RECORDS_PER_FILE[num_classes]):
        parts = [release.read(folder / name, num_classes) for name in names]
        for name, (_, labels) in zip(names, parts):
            if len(labels) != expected:
                raise DatasetError(f"{folder / name}: {len(labels)} records, expected the release's {expected}; "
                                   "the file is truncated or not an official batch: download the release again")
        splits.append(np.concatenate([p[0] for p in parts]))
        splits.append(np.concatenate([p[1] for p in parts]))
    train_x, train_y, test_x, test_y = splits
    return train_x, train_y, test_x, test_y
