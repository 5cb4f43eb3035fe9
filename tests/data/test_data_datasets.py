"""load_dataset's names, the bundled digits dataset, and the Dataset container."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
import torch

from lptfl.data import DATASET_NAMES, Dataset, canonical_name, load_dataset


def test_digits_has_mnist_shape_and_normalisation() -> None:
    ds = load_dataset("digits")
    assert ds.name == "digits" and ds.num_classes == 10 and ds.input_shape == (1, 28, 28)
    assert ds.train_x.shape == (1437, 1, 28, 28) and ds.test_x.shape == (360, 1, 28, 28)
    assert ds.train_x.dtype == torch.float32 and ds.train_y.dtype == torch.int64
    pixels = torch.cat([ds.train_x, ds.test_x]) * 0.3081 + 0.1307  # undo the MNIST normalisation
    assert pixels.min() >= -1e-6 and pixels.max() <= 1 + 1e-6 and pixels.max() > 0.99


def test_digits_split_is_fixed_and_stratified() -> None:
    first, again = load_dataset("Digits"), load_dataset("digits")
    assert torch.equal(first.test_x, again.test_x) and torch.equal(first.train_y, again.train_y)
    test_counts = torch.bincount(first.test_y, minlength=10)
    train_counts = torch.bincount(first.train_y, minlength=10)
    assert torch.all((test_counts - (train_counts + test_counts) * 0.2).abs() <= 1)


def test_default_dataset_is_digits() -> None:
    assert load_dataset().name == "digits"


@pytest.mark.parametrize(
    ("alias", "name"),
    [("MNIST", "mnist"), ("fashion-mnist", "fmnist"), ("FashionMNIST", "fmnist"), ("CIFAR-10", "cifar10"),
     ("cifar_100", "cifar100"), ("CINIC-10", "cinic10"), (" digits ", "digits")],
)
def test_canonical_names(alias: str, name: str) -> None:
    assert canonical_name(alias) == name and name in DATASET_NAMES


def test_unknown_name_lists_known_names(tmp_path) -> None:
    with pytest.raises(ValueError, match="unknown dataset 'imagenet'; known names: digits, mnist, fmnist, cifar10"):
        load_dataset("imagenet", tmp_path)


def _dataset(**changes) -> Dataset:
    fields = dict(name="t", train_x=torch.zeros(4, 1, 2, 2), train_y=torch.tensor([0, 1, 2, 1]),
                  test_x=torch.zeros(2, 1, 2, 2), test_y=torch.tensor([0, 2]), num_classes=3) | changes
    return Dataset(**fields)


def test_dataset_container() -> None:
    ds = _dataset()
    assert ds.input_shape == (1, 2, 2)
    assert repr(ds) == "Dataset(name='t', train=4, test=2, input_shape=(1, 2, 2), num_classes=3)"
    with pytest.raises(AttributeError):
        ds.name = "other"  # type: ignore[misc]


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"train_x": torch.zeros(4, 1, 2, 2, dtype=torch.float64)}, r"train_x must be float32 \(N, C, H, W\)"),
        ({"test_x": torch.zeros(2, 4)}, "test_x must be float32"),
        ({"train_y": torch.tensor([0, 1, 2])}, r"train_y must be int64 of shape \(4,\)"),
        ({"test_y": torch.tensor([0.0, 1.0])}, "test_y must be int64"),
        ({"test_y": torch.tensor([0, 3])}, r"test_y holds labels 0\.\.3, expected 0\.\.2"),
        ({"test_x": torch.zeros(2, 1, 3, 3)}, "train and test images differ in shape"),
    ],
)
def test_dataset_validation(changes, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        _dataset(**changes)


def test_digits_train_split_holds_every_class() -> None:
    assert np.array_equal(np.unique(load_dataset("digits").train_y.numpy()), np.arange(10))


def test_digits_are_scikit_learns_split_without_importing_it() -> None:
    """The stored split is train_test_split's; the images and labels are those of load_digits."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    from lptfl.data.digits import IMAGE_SIZE, MAX_VALUE, load_digits_28

    bunch = load_digits()
    small = torch.from_numpy(bunch.images.astype(np.float32) / MAX_VALUE).unsqueeze(1)
    images = torch.nn.functional.interpolate(small, size=(IMAGE_SIZE, IMAGE_SIZE), mode="bilinear",
                                             align_corners=False).numpy()
    expected = train_test_split(images, bunch.target.astype(np.int64), test_size=0.2, stratify=bunch.target,
                                random_state=0)
    train_x, train_y, test_x, test_y = load_digits_28()
    for got, want in zip((train_x, test_x, train_y, test_y), expected):
        assert got.dtype == want.dtype and np.array_equal(got, want)


def test_digits_load_without_scikit_learn_imported() -> None:
    code = ("import sys; from lptfl.data import load_dataset; load_dataset('digits'); "
            "assert not any(m == 'sklearn' or m.startswith('sklearn.') for m in sys.modules), 'sklearn imported'")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)


def test_digits_without_scikit_learn_name_the_package(monkeypatch) -> None:
    import importlib.util

    from lptfl.data.digits import digits_csv
    from lptfl.data.errors import DatasetError

    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    with pytest.raises(DatasetError, match="comes with scikit-learn, which is not installed: pip install scikit-learn"):
        digits_csv()
