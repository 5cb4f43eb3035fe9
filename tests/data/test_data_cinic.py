"""CINIC-10 image folders."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from lptfl.data import DatasetError, MissingFilesError, load_dataset

MEAN = np.array([0.4914, 0.4822, 0.4465], dtype=np.float32).reshape(1, 3, 1, 1)
STD = np.array([0.2023, 0.1994, 0.2010], dtype=np.float32).reshape(1, 3, 1, 1)


def test_cinic_loads_both_splits(tmp_path: Path, official) -> None:
    train_x, train_y, test_x, test_y = official.cinic(tmp_path, per_class=2)
    ds = load_dataset("CINIC-10", tmp_path)
    assert ds.name == "cinic10" and ds.input_shape == (3, 32, 32) and ds.num_classes == 10
    assert ds.train_y.tolist() == train_y.tolist() == sorted(train_y.tolist())
    assert ds.test_y.tolist() == test_y.tolist()
    torch.testing.assert_close(ds.train_x, torch.from_numpy((train_x / np.float32(255) - MEAN) / STD))
    torch.testing.assert_close(ds.test_x, torch.from_numpy((test_x / np.float32(255) - MEAN) / STD))


def test_grayscale_png_is_converted_to_rgb(tmp_path: Path, official) -> None:
    official.cinic(tmp_path)
    path = next((tmp_path / "CINIC-10" / "test" / "cat").glob("*.png"))
    Image.fromarray(np.full((32, 32), 255, np.uint8), "L").save(path)
    ds = load_dataset("cinic10", tmp_path)
    cat = ds.test_y.tolist().index(3)
    torch.testing.assert_close(ds.test_x[cat], torch.from_numpy(((1 - MEAN) / STD)[0]).expand(3, 32, 32))


def test_wrong_image_size(tmp_path: Path, official) -> None:
    official.cinic(tmp_path)
    path = next((tmp_path / "CINIC-10" / "train" / "ship").glob("*.png"))
    Image.new("RGB", (32, 31)).save(path)
    with pytest.raises(DatasetError, match=r"ship-0\.png: image is 32x31, expected 32x32"):
        load_dataset("cinic10", tmp_path)


@pytest.mark.parametrize("cut", [0, 20, 60])
def test_corrupt_png(tmp_path: Path, official, cut: int) -> None:
    official.cinic(tmp_path)
    path = next((tmp_path / "CINIC-10" / "train" / "dog").glob("*.png"))
    path.write_bytes(path.read_bytes()[:cut])
    with pytest.raises(DatasetError, match=r"dog-0\.png: cannot decode image"):
        load_dataset("cinic10", tmp_path)


def test_missing_class_folder(tmp_path: Path, official) -> None:
    official.cinic(tmp_path)
    for png in (tmp_path / "CINIC-10" / "test" / "truck").glob("*.png"):
        png.unlink()
    with pytest.raises(MissingFilesError, match=r"truck/\*\.png.*CINIC-10/test.*--download"):
        load_dataset("cinic10", tmp_path)
