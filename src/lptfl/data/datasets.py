"""Load a dataset by name into normalised tensors, once, with its train/test split."""

from __future__ import annotations

import logging
import re
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from .cifar import load_cifar
from .cinic import load_cinic
from .digits import load_digits_28
from .download import download_dataset, verify_published
from .errors import ChecksumError, MissingFilesError
from .mnist import load_mnist_release

logger = logging.getLogger(__name__)

DEFAULT_DATA_DIR = Path("data")
DATASET_NAMES = ("digits", "mnist", "fmnist", "cifar10", "cifar100", "cinic10")
_ALIASES = {"fashionmnist": "fmnist"}

MNIST_MEAN, MNIST_STD = (0.1307,), (0.3081,)
CIFAR_MEAN, CIFAR_STD = (0.4914, 0.4822, 0.4465), (0.2023, 0.1994, 0.2010)
# Per-channel (mean, std) of pixels in [0, 1], as in the paper (REFERENCE section 4).
NORMALISATION: dict[str, tuple[tuple[float, ...], tuple[float, ...]]] = {
    "digits": (MNIST_MEAN, MNIST_STD),
    "mnist": (MNIST_MEAN, MNIST_STD),
    "fmnist": (MNIST_MEAN, MNIST_STD),
    "cifar10": (CIFAR_MEAN, CIFAR_STD),
    "cifar100": (CIFAR_MEAN, CIFAR_STD),
    "cinic10": (CIFAR_MEAN, CIFAR_STD),
}
NUM_CLASSES = {"digits": 10, "mnist": 10, "fmnist": 10, "cifar10": 10, "cifar100": 100, "cinic10": 10}

RawSplits = tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]
# Loaders of file-based datasets: data directory -> uint8 images (N, C, H, W) and int64 labels.
_FILE_LOADERS: dict[str, Callable[[Path], RawSplits]] = {
    "mnist": lambda root: load_mnist_release(root / "MNIST" / "raw"),
    "fmnist": lambda root: load_mnist_release(root / "FashionMNIST" / "raw"),
    "cifar10": lambda root: load_cifar(root, 10),
    "cifar100": lambda root: load_cifar(root, 100),
    "cinic10": load_cinic,
}


@dataclass(frozen=True, eq=False)
class Dataset:
    """A whole dataset in memory.

    ``train_x`` / ``test_x``: float32 (N, C, H, W), pixels scaled to [0, 1] then normalised with the
    dataset's per-channel mean and std. ``train_y`` / ``test_y``: int64 (N,) in [0, num_classes).
    """

    name: str
    train_x: torch.Tensor = field(repr=False)
    train_y: torch.Tensor = field(repr=False)
    test_x: torch.Tensor = field(repr=False)
    test_y: torch.Tensor = field(repr=False)
    num_classes: int

    def __post_init__(self) -> None:
        for split in ("train", "test"):
            x, y = getattr(self, f"{split}_x"), getattr(self, f"{split}_y")
            if x.dtype != torch.float32 or x.ndim != 4:
                raise ValueError(f"{split}_x must be float32 (N, C, H, W), got {x.dtype} {tuple(x.shape)}")
            if y.dtype != torch.int64 or y.shape != (x.shape[0],):
                raise ValueError(
                    f"{split}_y must be int64 of shape ({x.shape[0]},) to match {split}_x, "
                    f"got {y.dtype} {tuple(y.shape)}"
                )
            if y.numel() and (int(y.min()) < 0 or int(y.max()) >= self.num_classes):
                raise ValueError(
                    f"{split}_y holds labels {int(y.min())}..{int(y.max())}, expected 0..{self.num_classes - 1}"
                )
        if self.train_x.shape[1:] != self.test_x.shape[1:]:
            raise ValueError(
                f"train and test images differ in shape: {tuple(self.train_x.shape[1:])} vs "
                f"{tuple(self.test_x.shape[1:])}"
            )

    @property
    def input_shape(self) -> tuple[int, int, int]:
        """(channels, height, width) of one image."""
        channels, height, width = self.train_x.shape[1:]
        return channels, height, width

    def __repr__(self) -> str:
        return (
            f"Dataset(name={self.name!r}, train={self.train_x.shape[0]}, test={self.test_x.shape[0]}, "
            f"input_shape={self.input_shape}, num_classes={self.num_classes})"
        )


def canonical_name(name: str) -> str:
    """Map a dataset name or alias (case, '-', '_' and spaces ignored) to one of DATASET_NAMES."""
    key = re.sub(r"[-_\s]", "", name.lower())
    key = _ALIASES.get(key, key)
    if key not in DATASET_NAMES:
        raise ValueError(
            f"unknown dataset {name!r}; known names: {', '.join(DATASET_NAMES)} "
            "(aliases: fashionmnist, fashion-mnist, FashionMNIST, cifar-10, cifar-100, cinic-10)"
        )
    return key


def _standardise(images: np.ndarray, mean: tuple[float, ...], std: tuple[float, ...]) -> torch.Tensor:
    """float32 images in [0, 1], (N, C, H, W) -> tensor of (x - mean[c]) / std[c], computed in place."""
    shape = (1, len(mean), 1, 1)
    images -= np.asarray(mean, dtype=np.float32).reshape(shape)
    images /= np.asarray(std, dtype=np.float32).reshape(shape)
    return torch.from_numpy(images)


def _unit_range(images: np.ndarray) -> np.ndarray:
    """uint8 pixels -> new float32 array in [0, 1]."""
    out = images.astype(np.float32)
    out /= 255.0
    return out


def _load_raw(key: str, root: Path, download: bool, mirror: str | None, verify: bool) -> RawSplits:
    """Images in [0, 1] as float32 (N, C, H, W) and int64 labels, the files with a published md5
    checked first (``verify``); with ``download``, missing files or ones failing their md5 are fetched."""
    if key == "digits":
        return load_digits_28()
    loader = _FILE_LOADERS[key]
    try:
        if verify:
            verify_published(key, root)
        train_x, train_y, test_x, test_y = loader(root)
    except (MissingFilesError, ChecksumError) as exc:
        if not download:
            raise
        problem = f"{exc.path} fails its md5" if isinstance(exc, ChecksumError) else f"missing {exc.missing}"
        logger.info("%s: %s; downloading the official release into %s", key, problem, root)
        download_dataset(key, root, mirror=mirror)
        train_x, train_y, test_x, test_y = loader(root)
    return _unit_range(train_x), train_y, _unit_range(test_x), test_y


def load_dataset(
    name: str = "digits",
    data_dir: str | Path | None = None,
    *,
    download: bool = False,
    mirror: str | None = None,
    verify: bool = True,
) -> Dataset:
    """Load dataset ``name`` from ``data_dir`` into normalised tensors.

    ``name``: one of DATASET_NAMES or an alias (case-insensitive). ``data_dir``: the folder holding
    the releases (default ``./data``; unused for ``digits``, which is bundled with scikit-learn).
    Layouts: ``MNIST/raw``, ``FashionMNIST/raw`` (IDX, raw or .gz), ``cifar-10-batches-bin`` or
    ``cifar-10-batches-py``, ``cifar-100-binary`` or ``cifar-100-python``, ``CINIC-10/{train,test}``.
    ``download``: fetch missing files from the official location (or ``mirror`` / env
    ``LPTFL_DATA_MIRROR``) with md5 verification, and fetch again those that fail their md5.
    ``verify``: check the files present that have a published md5 (once per process per file
    version, :func:`verify_published`) before loading.
    Raises ValueError for an unknown name, MissingFilesError (a DatasetError) for missing files,
    DatasetError for corrupt ones (an md5 mismatch included).
    """
    key = canonical_name(name)
    root = Path(data_dir).expanduser() if data_dir is not None else DEFAULT_DATA_DIR
    start = time.perf_counter()
    train_x, train_y, test_x, test_y = _load_raw(key, root, download, mirror, verify)
    mean, std = NORMALISATION[key]
    dataset = Dataset(
        name=key,
        train_x=_standardise(train_x, mean, std),
        train_y=torch.from_numpy(train_y),
        test_x=_standardise(test_x, mean, std),
        test_y=torch.from_numpy(test_y),
        num_classes=NUM_CLASSES[key],
    )
    logger.info("loaded %r in %.2f s", dataset, time.perf_counter() - start)
    return dataset
