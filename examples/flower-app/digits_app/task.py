"""The model, the data and the precision policy shared by the ServerApp and the ClientApp."""

from __future__ import annotations

from collections.abc import Mapping

import torch
from sklearn.datasets import load_digits
from torch import nn

from lptfl.quant import PrecisionPolicy

TEST_SIZE = 297  # of the 1797 digits; the other 1500 are split across the SuperNodes


def make_model() -> nn.Module:
    """An MLP: 8x8 images (64 inputs) -> 128 hidden units -> 10 classes."""
    torch.manual_seed(0)
    return nn.Sequential(nn.Flatten(), nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 10))


def _digits() -> tuple[torch.Tensor, torch.Tensor]:
    x, y = load_digits(return_X_y=True)  # bundled with scikit-learn: no download
    order = torch.randperm(len(y), generator=torch.Generator().manual_seed(0))
    return torch.tensor(x / 16.0, dtype=torch.float32)[order], torch.tensor(y)[order]


def train_partition(partition_id: int, num_partitions: int) -> tuple[torch.Tensor, torch.Tensor]:
    """This SuperNode's share of the training digits (every ``num_partitions``-th sample)."""
    x, y = _digits()
    return x[TEST_SIZE + partition_id::num_partitions], y[TEST_SIZE + partition_id::num_partitions]


def test_set() -> tuple[torch.Tensor, torch.Tensor]:
    """The held-out digits (x: 297 x 64 in [0, 1], y: 297 labels)."""
    x, y = _digits()
    return x[:TEST_SIZE], y[:TEST_SIZE]


def make_policy(run_config: Mapping) -> PrecisionPolicy:
    """The run's precision policy from the ``bits`` and ``layout`` settings."""
    return PrecisionPolicy.low_precision(int(run_config["bits"]), layout=str(run_config["layout"]))
