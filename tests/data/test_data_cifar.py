"""CIFAR-10/100: binary and python releases, the restricted unpickler, corrupt files."""

from __future__ import annotations

import logging
import os
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch

from lptfl.data import DatasetError, MissingFilesError, load_dataset
from lptfl.data.safe_pickle import RestrictedUnpickler, load_restricted

MEAN = np.array([0.4914, 0.4822, 0.4465], dtype=np.float32).reshape(1, 3, 1, 1)
STD = np.array([0.2023, 0.1994, 0.2010], dtype=np.float32).reshape(1, 3, 1, 1)


def expected_tensor(images: np.ndarray) -> torch.Tensor:
    return torch.from_numpy((images.astype(np.float32) / 255 - MEAN) / STD)


def check(ds, splits, num_classes: int) -> None:
    train_x, train_y, test_x, test_y = splits
    assert ds.num_classes == num_classes and ds.input_shape == (3, 32, 32)
    torch.testing.assert_close(ds.train_x, expected_tensor(train_x))
    torch.testing.assert_close(ds.test_x, expected_tensor(test_x))
    assert ds.train_y.tolist() == train_y.tolist() and ds.test_y.tolist() == test_y.tolist()


@pytest.mark.parametrize(("name", "num_classes"), [("cifar10", 10), ("CIFAR-100", 100)])
def test_binary_release(tmp_path: Path, official, name: str, num_classes: int) -> None:
    splits = official.cifar_binary(tmp_path, num_classes)
    ds = load_dataset(name, tmp_path)
    check(ds, splits, num_classes)
    assert ds.train_x.shape[0] == (15 if num_classes == 10 else 3)


@pytest.mark.parametrize("protocol", [None, 2, 4, 5])
@pytest.mark.parametrize(("name", "num_classes"), [("cifar10", 10), ("cifar100", 100)])
def test_python_release(tmp_path: Path, official, name: str, num_classes: int, protocol: int) -> None:
    splits = official.cifar_python(tmp_path, num_classes, protocol=protocol)
    check(load_dataset(name, tmp_path), splits, num_classes)


def test_binary_release_preferred_over_python(tmp_path: Path, official) -> None:
    official.cifar_python(tmp_path, 10)
    binary = official.cifar_binary(tmp_path, 10)
    check(load_dataset("cifar10", tmp_path), binary, 10)


def test_truncated_binary_batch(tmp_path: Path, official) -> None:
    official.cifar_binary(tmp_path, 10)
    path = tmp_path / "cifar-10-batches-bin" / "data_batch_3.bin"
    path.write_bytes(path.read_bytes()[:-7])
    with pytest.raises(DatasetError, match=r"data_batch_3\.bin: 9212 bytes is not a positive multiple of the 3073"):
        load_dataset("cifar10", tmp_path)


def test_batch_of_the_wrong_record_count(tmp_path: Path, official) -> None:
    official.cifar_binary(tmp_path, 10)
    path = tmp_path / "cifar-10-batches-bin" / "data_batch_3.bin"
    path.write_bytes(path.read_bytes()[:2 * 3073])  # cut at a record boundary
    with pytest.raises(DatasetError, match=r"data_batch_3\.bin: 2 records, expected the release's 3; .* truncated"):
        load_dataset("cifar10", tmp_path)
    official.cifar_python(tmp_path, 100)
    (tmp_path / "cifar-100-python" / "test").write_bytes(pickle.dumps({"data": np.zeros((4, 3072), np.uint8),
                                                                     "fine_labels": [0] * 4}))
    with pytest.raises(DatasetError, match=r"cifar-100-python/test: 4 records, expected the release's 3"):
        load_dataset("cifar100", tmp_path)


def test_incomplete_binary_release_falls_back_with_a_warning(tmp_path: Path, official, caplog) -> None:
    python = official.cifar_python(tmp_path, 10)
    official.cifar_binary(tmp_path, 10)
    (tmp_path / "cifar-10-batches-bin" / "data_batch_2.bin").unlink()
    with caplog.at_level(logging.WARNING, logger="lptfl.data"):
        check(load_dataset("cifar10", tmp_path), python, 10)
    [record] = caplog.records
    assert record.getMessage() == (f"{tmp_path / 'cifar-10-batches-bin'} lacks data_batch_2.bin; loading the python "
                                   f"release {tmp_path / 'cifar-10-batches-py'} instead")


def test_binary_label_out_of_range(tmp_path: Path, official) -> None:
    official.cifar_binary(tmp_path, 10)
    path = tmp_path / "cifar-10-batches-bin" / "test_batch.bin"
    path.write_bytes(bytes([12]) + path.read_bytes()[1:])
    with pytest.raises(DatasetError, match=r"test_batch\.bin: label 12 out of range, expected 0\.\.9"):
        load_dataset("cifar10", tmp_path)


def test_missing_release_names_binary_folder(tmp_path: Path) -> None:
    with pytest.raises(MissingFilesError, match=r"data_batch_1\.bin.*cifar-10-batches-bin.*download=True"):
        load_dataset("cifar10", tmp_path)


class _Exploit:
    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def test_malicious_pickle_is_refused(tmp_path: Path, official) -> None:
    official.cifar_python(tmp_path, 10)
    marker = tmp_path / "pwned"
    exploit = _Exploit()
    exploit.marker = marker
    payload = {"data": np.zeros((1, 3072), np.uint8), "labels": [0], "x": exploit}
    (tmp_path / "cifar-10-batches-py" / "data_batch_2").write_bytes(pickle.dumps(payload, protocol=2))
    with pytest.raises(DatasetError, match=r"data_batch_2: refusing to unpickle global (posix|os|nt)\.system"):
        load_dataset("cifar10", tmp_path)
    assert not marker.exists()


def test_python2_style_pickle_has_no_codecs_global(official, tmp_path: Path) -> None:
    official.cifar_python(tmp_path, 10)
    data = (tmp_path / "cifar-10-batches-py" / "test_batch").read_bytes()
    assert b"numpy.core.multiarray\n_reconstruct" in data and b"_codecs" not in data


def test_codecs_encode_admitted_only_for_latin1(tmp_path: Path) -> None:
    path = tmp_path / "codec.pkl"
    path.write_bytes(pickle.dumps(b"\x00\xffraw", protocol=2))
    assert load_restricted(path) == b"\x00\xffraw"
    path.write_bytes(pickle.dumps(b"abc", protocol=2).replace(b"latin1", b"rot_13"))
    with pytest.raises(DatasetError, match="encoding 'rot_13'"):
        load_restricted(path)


@pytest.mark.parametrize("payload", [eval, bytearray, np.load])
def test_restricted_unpickler_refuses_other_globals(tmp_path: Path, payload) -> None:
    path = tmp_path / "bad.pkl"
    path.write_bytes(pickle.dumps(payload))
    with pytest.raises(DatasetError, match="refusing to unpickle global"):
        load_restricted(path)


def test_restricted_unpickler_refuses_persistent_ids(tmp_path: Path) -> None:
    class Pickler(pickle.Pickler):
        def persistent_id(self, obj):
            return "ref" if obj == "secret" else None

    path = tmp_path / "persistent.pkl"
    with path.open("wb") as f:
        Pickler(f).dump(["secret"])
    with pytest.raises(DatasetError, match="persistent id"):
        load_restricted(path)


def test_restricted_unpickler_admits_arrays_and_containers(tmp_path: Path) -> None:
    value = {"a": [1, 2.5, "s", b"raw", (3, None)], "arr": np.arange(6, dtype=np.int16).reshape(2, 3)}
    path = tmp_path / "ok.pkl"
    path.write_bytes(pickle.dumps(value, protocol=4))
    loaded = load_restricted(path)
    assert loaded["a"] == value["a"]
    np.testing.assert_array_equal(loaded["arr"], value["arr"])
    assert issubclass(RestrictedUnpickler, pickle.Unpickler)


def test_truncated_pickle(tmp_path: Path, official) -> None:
    official.cifar_python(tmp_path, 100)
    path = tmp_path / "cifar-100-python" / "test"
    path.write_bytes(path.read_bytes()[:-20])
    with pytest.raises(DatasetError, match=r"cifar-100-python/test: not a valid pickle"):
        load_dataset("cifar100", tmp_path)


@pytest.mark.parametrize(
    ("batch", "message"),
    [
        ([1, 2], "unpickled a list, expected a dict"),
        ({"data": np.zeros((2, 3072), np.uint8)}, r"lacks key\(s\) \['labels'\]"),
        ({"data": np.zeros((2, 3072), np.float32), "labels": [0, 1]}, "float32 array of shape"),
        ({"data": np.zeros((2, 100), np.uint8), "labels": [0, 1]}, r"expected a uint8 array of shape \(N, 3072\)"),
        ({"data": np.zeros((2, 3072), np.uint8), "labels": [0]}, r"shape \(1,\), expected \(2,\)"),
        ({"data": np.zeros((2, 3072), np.uint8), "labels": [0, "x"]}, "not a list of integers"),
        ({"data": np.zeros((2, 3072), np.uint8), "labels": [0, -1]}, "label -1 out of range"),
    ],
)
def test_python_batch_content_is_validated(tmp_path: Path, official, batch, message: str) -> None:
    official.cifar_python(tmp_path, 10)
    (tmp_path / "cifar-10-batches-py" / "test_batch").write_bytes(pickle.dumps(batch, protocol=4))
    with pytest.raises(DatasetError, match=message):
        load_dataset("cifar10", tmp_path)
