"""MNIST / Fashion-MNIST: strict IDX parsing, both gz and raw files, normalisation, error messages."""

from __future__ import annotations

import gzip
from pathlib import Path

import numpy as np
import pytest
import torch

from lptfl.data import DatasetError, MissingFilesError, load_dataset
from lptfl.data.idx import parse_idx

MEAN, STD = 0.1307, 0.3081


def expected_tensor(images: np.ndarray) -> torch.Tensor:
    return torch.from_numpy((images.astype(np.float32) / 255 - MEAN) / STD)


@pytest.mark.parametrize("gz", [True, False])
def test_mnist_loads_train_and_t10k_splits(tmp_path: Path, official, gz: bool) -> None:
    train_x, train_y, test_x, test_y = official.mnist(tmp_path / "MNIST" / "raw", gz=gz)
    ds = load_dataset("MNIST", tmp_path)
    assert ds.name == "mnist" and ds.num_classes == 10 and ds.input_shape == (1, 28, 28)
    assert ds.train_x.dtype == torch.float32 and ds.train_y.dtype == torch.int64
    torch.testing.assert_close(ds.train_x, expected_tensor(train_x))
    torch.testing.assert_close(ds.test_x, expected_tensor(test_x))  # t10k, not the training set
    assert ds.train_y.tolist() == train_y.tolist() and ds.test_y.tolist() == test_y.tolist()


@pytest.mark.parametrize("alias", ["fmnist", "fashionmnist", "fashion-mnist", "FashionMNIST", "Fashion_MNIST"])
def test_fashion_mnist_aliases_read_fashionmnist_folder(tmp_path: Path, official, alias: str) -> None:
    _, train_y, _, test_y = official.mnist(tmp_path / "FashionMNIST" / "raw")
    ds = load_dataset(alias, tmp_path)
    assert ds.name == "fmnist"
    assert ds.train_y.tolist() == train_y.tolist() and ds.test_y.tolist() == test_y.tolist()


def test_mixed_gz_and_raw_files(tmp_path: Path, official) -> None:
    raw = tmp_path / "MNIST" / "raw"
    _, train_y, _, _ = official.mnist(raw)
    gz_path = raw / "train-labels-idx1-ubyte.gz"
    (raw / "train-labels-idx1-ubyte").write_bytes(gzip.decompress(gz_path.read_bytes()))
    gz_path.unlink()
    assert load_dataset("mnist", tmp_path).train_y.tolist() == train_y.tolist()


def _rewrite(path: Path, change) -> None:
    path.write_bytes(gzip.compress(change(gzip.decompress(path.read_bytes()))))


@pytest.mark.parametrize(
    ("file", "change", "message"),
    [
        ("train-images-idx3-ubyte.gz", lambda b: b[:-1], "truncated"),
        ("train-images-idx3-ubyte.gz", lambda b: b + b"\0", "extra bytes"),
        ("train-images-idx3-ubyte.gz", lambda b: b[:10], "header"),
        ("t10k-labels-idx1-ubyte.gz", lambda b: b[:2], "too short"),
        ("train-images-idx3-ubyte.gz", lambda b: b"\0\0\x08\x01" + b[4:], "magic 0x00000801"),
        ("train-labels-idx1-ubyte.gz", lambda b: b"\0\0\x09\x01" + b[4:], "magic"),
        ("train-labels-idx1-ubyte.gz", lambda b: b[:8] + bytes([10]) + b[9:], "label 10 out of range"),
        ("t10k-labels-idx1-ubyte.gz", lambda b: b[:7] + bytes([b[7] - 1]) + b[8:-1], "holds 6 images but .* 5 labels"),
    ],
)
def test_corrupt_idx_file_raises_dataset_error_naming_it(tmp_path, official, file, change, message) -> None:
    raw = tmp_path / "MNIST" / "raw"
    official.mnist(raw)
    _rewrite(raw / file, change)
    with pytest.raises(DatasetError, match=message) as info:
        load_dataset("mnist", tmp_path)
    assert file.removesuffix(".gz") in str(info.value)


def test_not_gzip_data_in_gz_file(tmp_path: Path, official) -> None:
    raw = tmp_path / "MNIST" / "raw"
    official.mnist(raw)
    (raw / "train-images-idx3-ubyte.gz").write_bytes(b"not gzip at all")
    with pytest.raises(DatasetError, match=r"train-images-idx3-ubyte\.gz: not a valid gzip"):
        load_dataset("mnist", tmp_path)


def test_truncated_gzip_stream(tmp_path: Path, official) -> None:
    raw = tmp_path / "MNIST" / "raw"
    official.mnist(raw)
    path = raw / "train-images-idx3-ubyte.gz"
    path.write_bytes(path.read_bytes()[:100])
    with pytest.raises(DatasetError, match="not a valid gzip"):
        load_dataset("mnist", tmp_path)


def test_parse_idx_returns_the_header_shape() -> None:
    data = bytes([0, 0, 8, 3]) + np.array([1, 5, 5], ">u4").tobytes() + bytes(25)
    assert parse_idx(data, ndim=3, source="x").shape == (1, 5, 5)


def test_non_28x28_mnist_images_raise(tmp_path: Path, official) -> None:
    raw = tmp_path / "MNIST" / "raw"
    official.mnist(raw)
    data = bytes([0, 0, 8, 3]) + np.array([12, 14, 56], ">u4").tobytes() + bytes(12 * 14 * 56)
    (raw / "train-images-idx3-ubyte.gz").write_bytes(gzip.compress(data))
    with pytest.raises(DatasetError, match="14x56, expected 28x28"):
        load_dataset("mnist", tmp_path)


def test_missing_file_message_names_file_directory_and_fix(tmp_path: Path, official) -> None:
    raw = tmp_path / "MNIST" / "raw"
    official.mnist(raw)
    (raw / "t10k-images-idx3-ubyte.gz").unlink()
    with pytest.raises(MissingFilesError) as info:
        load_dataset("mnist", tmp_path)
    text = str(info.value)
    assert "t10k-images-idx3-ubyte" in text and str(raw) in text
    assert "download=True" in text and "--download" in text


def test_missing_everything_when_folder_absent(tmp_path: Path) -> None:
    with pytest.raises(DatasetError, match="FashionMNIST"):
        load_dataset("fmnist", tmp_path)


def test_a_data_path_under_the_home_folder_is_expanded(tmp_path: Path, official, monkeypatch) -> None:
    """``~`` in a config file's data_path (no shell expands it there) means the home folder."""
    monkeypatch.setenv("HOME", str(tmp_path))
    _, train_y, _, _ = official.mnist(tmp_path / "data" / "MNIST" / "raw", gz=True)
    assert load_dataset("mnist", "~/data").train_y.tolist() == train_y.tolist()
