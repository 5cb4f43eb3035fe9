"""MNIST and Fashion-MNIST in torchvision's folder layout: ``<data_dir>/<folder>/raw/<idx files>``."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from .errors import DatasetError, MissingFilesError
from .idx import read_idx

IMAGE_SIZE = 28
NUM_CLASSES = 10
SPLIT_FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}


def _locate(raw_dir: Path, name: str) -> Path:
    """Return ``raw_dir/name.gz`` or ``raw_dir/name``, whichever exists (the .gz, which has a published
    md5, first)."""
    for candidate in (raw_dir / f"{name}.gz", raw_dir / name):
        if candidate.is_file():
            return candidate
    raise MissingFilesError(f"{name} (or {name}.gz)", raw_dir)


def _load_split(images_path: Path, labels_path: Path) -> tuple[np.ndarray, np.ndarray]:
    images = read_idx(images_path, ndim=3)
    labels = read_idx(labels_path, ndim=1)
    if images.shape[1:] != (IMAGE_SIZE, IMAGE_SIZE):
        raise DatasetError(
            f"{images_path}: images are {images.shape[1]}x{images.shape[2]}, expected "
            f"{IMAGE_SIZE}x{IMAGE_SIZE}; this is not an MNIST-format image file"
        )
    if images.shape[0] != labels.shape[0]:
        raise DatasetError(
            f"{images_path} holds {images.shape[0]} images but {labels_path} holds {labels.shape[0]} "
            "labels; the two files must come from the same split of the same release"
        )
    if labels.size and int(labels.max()) >= NUM_CLASSES:
        raise DatasetError(
            f"{labels_path}: label {int(labels.max())} out of range, expected 0..{NUM_CLASSES - 1}"
        )
    return images[:, None], labels.astype(np.int64)


def load_mnist_release(raw_dir: Path) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Load the four IDX files of an MNIST-format release from ``raw_dir``.

    Each file may be raw or gzipped (``.gz``, read when both exist). The test split comes from the t10k files.
    Returns ``(train_x, train_y, test_x, test_y)``: images uint8 of shape (N, 1, 28, 28),
    labels int64 of shape (N,). Raises MissingFilesError before parsing anything if a file is
    absent, DatasetError if a file is corrupt.
    """
    paths = {split: tuple(_locate(raw_dir, name) for name in names) for split, names in SPLIT_FILES.items()}
    train_x, train_y = _load_split(*paths["train"])
    test_x, test_y = _load_split(*paths["test"])
    return train_x, train_y, test_x, test_y
