"""CINIC-10 from its image folders: ``<data_dir>/CINIC-10/{train,test}/<class>/*.png`` (32x32 RGB).

The release's ``valid`` split is not used (the paper trains on ``train`` and tests on ``test``).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

from .errors import DatasetError, MissingFilesError

FOLDER = "CINIC-10"
CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")
IMAGE_SIZE = 32


def _list_split(split_dir: Path) -> tuple[list[Path], np.ndarray]:
    """Sorted PNG paths of every class folder under ``split_dir`` and their int64 labels."""
    files: list[Path] = []
    labels: list[int] = []
    for label, name in enumerate(CLASSES):
        class_dir = split_dir / name
        pngs = sorted(class_dir.glob("*.png")) if class_dir.is_dir() else []
        if not pngs:
            raise MissingFilesError(f"{name}/*.png", split_dir)
        files += pngs
        labels += [label] * len(pngs)
    return files, np.asarray(labels, dtype=np.int64)


def _read_images(files: list[Path]) -> np.ndarray:
    """Decode PNGs into one uint8 array of shape (N, 3, 32, 32)."""
    images = np.empty((len(files), IMAGE_SIZE, IMAGE_SIZE, 3), dtype=np.uint8)
    for i, path in enumerate(files):
        try:
            with Image.open(path) as image:
                rgb = image.convert("RGB")
        except (OSError, SyntaxError, ValueError) as exc:  # Pillow reports broken files with these
            raise DatasetError(f"{path}: cannot decode image ({exc}); replace it with the official file") from exc
        if rgb.size != (IMAGE_SIZE, IMAGE_SIZE):
            raise DatasetError(
                f"{path}: image is {rgb.size[0]}x{rgb.size[1]}, expected {IMAGE_SIZE}x{IMAGE_SIZE} "
                "(CINIC-10 images are 32x32)"
            )
        images[i] = np.asarray(rgb)
    return images.transpose(0, 3, 1, 2)


def load_cinic(root: Path) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Load CINIC-10 train and test splits from ``root/CINIC-10``.

    Returns ``(train_x, train_y, test_x, test_y)``: images uint8 (N, 3, 32, 32), labels int64 (N,),
    with labels in the order of CLASSES. Raises MissingFilesError if a class folder is absent or
    empty (checked for both splits before decoding), DatasetError for an undecodable or
    wrongly-sized image.
    """
    listed = [_list_split(root / FOLDER / split) for split in ("train", "test")]
    (train_files, train_y), (test_files, test_y) = listed
    return _read_images(train_files), train_y, _read_images(test_files), test_y
