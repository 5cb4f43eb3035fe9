"""Dataset files with a published md5 are verified at load (issue 35, point 6): once per process per
file version, a mismatch an error naming the file, unless --no_verify."""

from __future__ import annotations

import gzip
import logging
import os
from pathlib import Path

import pytest

from lptfl.cli import main
from lptfl.data import download, load_dataset
from lptfl.data.errors import ChecksumError
from lptfl.data.download import Resource, Source, file_md5
from lptfl.experiment.config import RunConfig

NAMES = ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz", "t10k-images-idx3-ubyte.gz",
         "t10k-labels-idx1-ubyte.gz")


@pytest.fixture
def tiny_mnist(tmp_path: Path, official, monkeypatch) -> Path:
    """Tiny MNIST .gz files under ``tmp_path``, registered with their true md5s; the data folder."""
    raw = tmp_path / "MNIST" / "raw"
    official.mnist(raw, n_train=40, n_test=10)
    resources = tuple(Resource(name, file_md5(raw / name), "MNIST/raw") for name in NAMES)
    monkeypatch.setitem(download.SOURCES, "mnist", Source("http://127.0.0.1:9/", resources))
    monkeypatch.setattr(download, "_MD5_SEEN", {})
    return tmp_path


def expect_md5(name: str, md5: str) -> None:
    """Register ``md5`` as the published digest of MNIST file ``name``."""
    download.SOURCES["mnist"] = Source("http://127.0.0.1:9/", tuple(
        Resource(r.filename, md5 if r.filename == name else r.md5, r.subdir)
        for r in download.SOURCES["mnist"].resources))


def test_a_file_with_another_md5_is_refused_naming_it(tiny_mnist: Path) -> None:
    assert load_dataset("mnist", tiny_mnist).train_x.shape[0] == 40
    path = tiny_mnist / "MNIST" / "raw" / NAMES[2]
    expect_md5(NAMES[2], "0" * 32)
    message = rf"^{path}: md5 [0-9a-f]{{32}}, expected the published 0{{32}}; .*--no_verify"
    with pytest.raises(ChecksumError, match=message):
        load_dataset("mnist", tiny_mnist)
    assert load_dataset("mnist", tiny_mnist, verify=False).test_x.shape[0] == 10


def test_each_file_is_hashed_once_per_version(tiny_mnist: Path, monkeypatch) -> None:
    hashed: list[str] = []
    real = download.file_md5
    monkeypatch.setattr(download, "file_md5", lambda path: hashed.append(path.name) or real(path))
    load_dataset("mnist", tiny_mnist)
    load_dataset("mnist", tiny_mnist)
    assert sorted(hashed) == sorted(NAMES)  # the second load hashed nothing
    path = tiny_mnist / "MNIST" / "raw" / NAMES[0]
    os.utime(path, ns=(path.stat().st_atime_ns, path.stat().st_mtime_ns + 1_000_000))  # a new version
    load_dataset("mnist", tiny_mnist)
    assert hashed[4:] == [NAMES[0]]


def test_the_command_line_refuses_a_mismatch_in_one_line_unless_no_verify(tiny_mnist: Path, tmp_path, capsys) -> None:
    path = tiny_mnist / "MNIST" / "raw" / NAMES[1]
    expect_md5(NAMES[1], "f" * 32)
    argv = ["run", "--dataset", "mnist", "--data_path", str(tiny_mnist), "--num_clients", "2", "--model_width", "4",
            "--compile", "off", "--c_rounds", "1", "--quiet", "--out", str(tmp_path / "out")]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"lptfl: error: {path}: md5 ") and err.count("\n") == 1
    assert not (tmp_path / "out").exists()
    assert main([*argv, "--no_verify"]) == 0


def test_the_checked_gz_is_loaded_when_the_uncompressed_file_is_beside_it(tiny_mnist: Path) -> None:
    raw = tiny_mnist / "MNIST" / "raw"
    expected = load_dataset("mnist", tiny_mnist).train_y.tolist()
    labels = gzip.decompress((raw / NAMES[1]).read_bytes())
    (raw / NAMES[1].removesuffix(".gz")).write_bytes(labels[:8] + bytes(len(labels) - 8))  # all labels 0
    assert load_dataset("mnist", tiny_mnist).train_y.tolist() == expected


def test_uncompressed_files_without_their_gz_are_reported_unchecked_once(tiny_mnist: Path, caplog) -> None:
    raw = tiny_mnist / "MNIST" / "raw"
    for name in NAMES:
        (raw / name.removesuffix(".gz")).write_bytes(gzip.decompress((raw / name).read_bytes()))
        (raw / name).unlink()
    with caplog.at_level(logging.WARNING, logger="lptfl.data"):
        load_dataset("mnist", tiny_mnist)
        load_dataset("mnist", tiny_mnist)
    [record] = caplog.records
    assert record.getMessage().startswith(", ".join(str(raw / n.removesuffix(".gz")) for n in NAMES) +
                                          ": no published md5 (only the .gz files have one); loaded unchecked")


def test_no_verify_is_outside_the_fingerprint() -> None:
    assert RunConfig(no_verify=True).fingerprint() == RunConfig().fingerprint()
