"""scikit-learn's bundled handwritten digits, upsampled to MNIST's 28x28 so it needs no files."""

from __future__ import annotations

import numpy as np
import torch

IMAGE_SIZE = 28
NUM_CLASSES = 10
MAX_VALUE = 16.0  # the bundled images hold integers 0..16
TEST_FRACTION = 0.2
SPLIT_SEED = 0  # fixed, so the split never depends on a run's seed


def load_digits_28() -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Return the 1797 8x8 digits scaled to [0, 1] and bilinearly resized to 28x28.

    Split 80/20, stratified by class, with a fixed seed. Returns ``(train_x, train_y, test_x,
    test_y)``: images float32 (N, 1, 28, 28) in [0, 1], labels int64 (N,).
    """
    # Imported here: scikit-learn takes seconds to import and only this dataset needs it.
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    bunch = load_digits()
    small = torch.from_numpy(bunch.images.astype(np.float32) / MAX_VALUE).unsqueeze(1)
    images = torch.nn.functional.interpolate(
        small, size=(IMAGE_SIZE, IMAGE_SIZE), mode="bilinear", align_corners=False
    ).numpy()
    labels = bunch.target.astype(np.int64)
    train_x, test_x, train_y, test_y = train_test_split(
        images, labels, test_size=TEST_FRACTION, stratify=labels, random_state=SPLIT_SEED
    )
    return train_x, train_y, test_x, test_y
