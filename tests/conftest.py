"""Test-wide settings: one torch thread (the tests' tensors are small; on a shared 2-core
machine a second thread mostly adds synchronisation stalls)."""

import gzip
import struct

import numpy as np
import pytest
import torch

torch.set_num_threads(1)


def write_idx(path, array, magic):
    header = struct.pack(">I", magic) + b"".join(struct.pack(">I", d) for d in array.shape)
    with gzip.open(path, "wb") as handle:
        handle.write(header + array.astype(np.uint8).tobytes())


def _tiny_fmnist(root, n_train=240, n_test=80):
    """A tiny Fashion-MNIST in the official IDX layout: class k images are bright in row band k."""
    rng = np.random.default_rng(0)
    raw = root / "FashionMNIST" / "raw"
    raw.mkdir(parents=True)
    for prefix, n in (("train", n_train), ("t10k", n_test)):
        labels = np.arange(n) % 10
        images = rng.integers(0, 40, size=(n, 28, 28))
        for i, c in enumerate(labels):
            images[i, 2 * c + 4 : 2 * c + 7, :] = 250
        write_idx(raw / f"{prefix}-images-idx3-ubyte.gz", images, 0x803)
        write_idx(raw / f"{prefix}-labels-idx1-ubyte.gz", labels, 0x801)
    return root


@pytest.fixture
def tiny_fmnist():
    """Writes a tiny Fashion-MNIST in the official IDX layout under a given root (returns the root)."""
    return _tiny_fmnist
