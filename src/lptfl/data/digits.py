"""scikit-learn's bundled handwritten digits, upsampled to MNIST's 28x28 so it needs no files."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import numpy as np
import torch

from .errors import DatasetError

IMAGE_SIZE = 28
NUM_CLASSES = 10
MAX_VALUE = 16.0  # the bundled images hold integers 0..16
# The fixed 80/20 split, stratified by class: the train and test orders of scikit-learn's
# train_test_split (the call is recorded in the file), stored so that loading the digits does not
# import scikit-learn, which takes about a second in every process that loads them.
SPLIT_FILE = Path(__file__).with_name("digits_split.json")


def digits_csv() -> Path:
    """The digits file scikit-learn installs (``sklearn/datasets/data/digits.csv.gz``: 1797 rows of
    64 pixel values then the label), found without importing scikit-learn.

    Raises:
        DatasetError: scikit-learn is not installed, or its copy lacks the file.
    """
    spec = importlib.util.find_spec("sklearn")
    if spec is None or not spec.submodule_search_locations:
        raise DatasetError("the digits dataset comes with scikit-learn, which is not installed: "
                           "pip install scikit-learn")
    path = Path(next(iter(spec.submodule_search_locations))) / "datasets" / "data" / "digits.csv.gz"
    if not path.is_file():
        raise DatasetError(f"scikit-learn's digits file {path} is missing: reinstall scikit-learn")
    return path


def load_digits_28() -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Return the 1797 8x8 digits scaled to [0, 1] and bilinearly resized to 28x28.

    Split 80/20, stratified by class, always the same way (:data:`SPLIT_FILE`). Returns ``(train_x,
    train_y, test_x, test_y)``: images float32 (N, 1, 28, 28) in [0, 1], labels int64 (N,).
    """
    table = np.loadtxt(digits_csv(), delimiter=",")
    small = torch.from_numpy(table[:, :-1].reshape(-1, 8, 8).astype(np.float32) / MAX_VALUE).unsqueeze(1)
    images = torch.nn.functional.interpolate(
        small, size=(IMAGE_SIZE, IMAGE_SIZE), mode="bilinear", align_corners=False
    ).numpy()
    labels = table[:, -1].astype(np.int64)
    split = json.loads(SPLIT_FILE.read_text())
    train, test = np.asarray(split["train"]), np.asarray(split["test"])
    return images[train], labels[train], images[test], labels[test]
