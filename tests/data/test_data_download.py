"""Checksummed download from a local HTTP server, atomic placement, safe tar extraction."""

from __future__ import annotations

import hashlib
import io
import tarfile
from pathlib import Path

import pytest

from lptfl.data import MIRROR_ENV, DatasetError, download_dataset, load_dataset
from lptfl.data import download as download_module
from lptfl.data.download import Resource, Source, extract_tar

UNREACHABLE = "http://127.0.0.1:9/unreachable/"  # discard port: never used when a mirror is given


def md5(path: Path) -> str:
    return hashlib.md5(path.read_bytes()).hexdigest()


def register(monkeypatch: pytest.MonkeyPatch, name: str, files: list[Path], **resource_fields) -> None:
    """Point SOURCES[name] at ``files`` (their real md5) so tests control the checksums."""
    resources = tuple(Resource(f.name, md5(f), **resource_fields) for f in files)
    monkeypatch.setitem(download_module.SOURCES, name, Source(UNREACHABLE, resources))


def leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.rglob("*") if p.name.endswith(".part"))


def test_mnist_download_through_mirror_argument(tmp_path: Path, http_root, official, monkeypatch) -> None:
    www, url = http_root
    splits = official.mnist(www / "mnist")
    register(monkeypatch, "mnist", sorted((www / "mnist").iterdir()), subdir="MNIST/raw")
    data_dir = tmp_path / "data"
    ds = load_dataset("mnist", data_dir, download=True, mirror=url)
    raw = data_dir / "MNIST" / "raw"
    assert sorted(p.name for p in raw.iterdir()) == sorted(p.name for p in (www / "mnist").iterdir())
    for served in (www / "mnist").iterdir():
        assert (raw / served.name).read_bytes() == served.read_bytes()
    assert ds.train_y.tolist() == splits[1].tolist() and ds.test_y.tolist() == splits[3].tolist()
    assert leftovers(data_dir) == []


def test_cifar_tarball_download_through_env_mirror(tmp_path: Path, http_root, official, monkeypatch) -> None:
    www, url = http_root
    staging = tmp_path / "staging"
    splits = official.cifar_binary(staging, 10)
    (www / "cifar10").mkdir()
    archive = www / "cifar10" / "cifar-10-binary.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(staging / "cifar-10-batches-bin", arcname="cifar-10-batches-bin")
    register(monkeypatch, "cifar10", [archive], extract_to="")
    monkeypatch.setenv(MIRROR_ENV, url + "/")
    data_dir = tmp_path / "data"
    ds = load_dataset("cifar10", data_dir, download=True)
    assert ds.train_y.tolist() == splits[1].tolist()
    assert (data_dir / "cifar-10-binary.tar.gz").read_bytes() == archive.read_bytes()
    assert leftovers(data_dir) == []


def test_cinic_tarball_unpacks_into_cinic_folder(tmp_path: Path, http_root, official, monkeypatch) -> None:
    www, url = http_root
    staging = tmp_path / "staging"
    splits = official.cinic(staging)
    (www / "cinic10").mkdir()
    archive = www / "cinic10" / "CINIC-10.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:  # the official tarball has train/ valid/ test/ at its top
        for split in ("train", "test"):
            tar.add(staging / "CINIC-10" / split, arcname=split)
    register(monkeypatch, "cinic10", [archive], extract_to="CINIC-10")
    ds = load_dataset("cinic10", tmp_path / "data", download=True, mirror=url)
    assert ds.test_y.tolist() == splits[3].tolist()


def test_checksum_mismatch_leaves_nothing(tmp_path: Path, http_root, monkeypatch) -> None:
    www, url = http_root
    (www / "fmnist").mkdir()
    (www / "fmnist" / "train-images-idx3-ubyte.gz").write_bytes(b"tampered content")
    monkeypatch.setitem(download_module.SOURCES, "fmnist", Source(UNREACHABLE, (
        Resource("train-images-idx3-ubyte.gz", "0" * 32, "FashionMNIST/raw"),)))
    data_dir = tmp_path / "data"
    with pytest.raises(DatasetError, match=r"checksum mismatch .*train-images-idx3-ubyte\.gz.*expected 0{32}"):
        load_dataset("fmnist", data_dir, download=True, mirror=url)
    assert not data_dir.exists()  # the folders the download created are gone with it


def test_http_error_names_the_url_and_keeps_only_folders_that_existed(tmp_path: Path, http_root, monkeypatch) -> None:
    _, url = http_root
    monkeypatch.setitem(download_module.SOURCES, "mnist", Source(UNREACHABLE, (
        Resource("nothing-here.gz", "0" * 32, "MNIST/raw"),)))
    (tmp_path / "data" / "MNIST").mkdir(parents=True)
    with pytest.raises(DatasetError, match=rf"could not download {url}/mnist/nothing-here\.gz: HTTP Error 404"):
        download_dataset("mnist", tmp_path / "data", mirror=url)
    assert list((tmp_path / "data").rglob("*")) == [tmp_path / "data" / "MNIST"]


def test_file_url_mirror(tmp_path: Path, official, monkeypatch) -> None:
    mirror = tmp_path / "mirror"
    splits = official.mnist(mirror / "mnist")
    register(monkeypatch, "mnist", sorted((mirror / "mnist").iterdir()), subdir="MNIST/raw")
    monkeypatch.setenv(MIRROR_ENV, mirror.as_uri())
    ds = load_dataset("mnist", tmp_path / "data", download=True)
    assert ds.test_y.tolist() == splits[3].tolist()


@pytest.mark.parametrize("is_folder", [False, True])
def test_mirror_that_is_not_a_url_is_refused_naming_the_variable(tmp_path: Path, monkeypatch, is_folder) -> None:
    monkeypatch.chdir(tmp_path)
    if is_folder:
        (tmp_path / "mirror-dir").mkdir()
    monkeypatch.setenv(MIRROR_ENV, "mirror-dir")
    hint = rf" \({(tmp_path / 'mirror-dir').as_uri()} for that folder\)" if is_folder else ""
    with pytest.raises(ValueError, match=rf"^{MIRROR_ENV}='mirror-dir' is not a URL; expected http://, https:// "
                                         rf"or file:// and the address of a folder serving .*<file>{hint}$"):
        load_dataset("mnist", tmp_path / "data", download=True)
    assert not (tmp_path / "data").exists()


def test_download_fetches_a_file_failing_its_md5_again(tmp_path: Path, http_root, official, monkeypatch) -> None:
    www, url = http_root
    splits = official.mnist(www / "mnist")
    register(monkeypatch, "mnist", sorted((www / "mnist").iterdir()), subdir="MNIST/raw")
    damaged = tmp_path / "MNIST" / "raw" / "train-labels-idx1-ubyte.gz"
    served = www / "mnist" / damaged.name
    good = served.read_bytes()
    official.mnist(damaged.parent)  # other content: every file fails its md5
    before = damaged.read_bytes()
    served.write_bytes(b"bad mirror")
    with pytest.raises(DatasetError, match=r"checksum mismatch"):
        load_dataset("mnist", tmp_path, download=True, mirror=url)
    assert damaged.read_bytes() == before  # kept until a copy verifies
    served.write_bytes(good)
    ds = load_dataset("mnist", tmp_path, download=True, mirror=url)
    assert ds.train_y.tolist() == splits[1].tolist() and damaged.read_bytes() == good
    assert leftovers(tmp_path) == []


def test_file_with_right_md5_is_not_fetched_again(tmp_path: Path, monkeypatch) -> None:
    present = tmp_path / "MNIST" / "raw" / "train-images-idx3-ubyte.gz"
    present.parent.mkdir(parents=True)
    present.write_bytes(b"already here")
    register(monkeypatch, "mnist", [present], subdir="MNIST/raw")
    download_dataset("mnist", tmp_path)  # the unreachable official URL would fail if it were used
    assert present.read_bytes() == b"already here"


def test_unknown_source_is_a_value_error(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="no download source for dataset 'digits'; known: cifar10"):
        download_dataset("digits", tmp_path)


def _tar_with(path: Path, member: tarfile.TarInfo, data: bytes = b"") -> None:
    with tarfile.open(path, "w:gz") as tar:
        ok = tarfile.TarInfo("fine/ok.txt")
        ok.size = 2
        tar.addfile(ok, io.BytesIO(b"ok"))
        member.size = len(data) if member.isfile() else 0
        tar.addfile(member, io.BytesIO(data) if member.isfile() else None)


def _member(name: str, kind: bytes = tarfile.REGTYPE, target: str = "") -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type = kind
    info.linkname = target
    return info


@pytest.mark.parametrize(
    ("member", "message"),
    [
        (_member("../escape.txt"), "absolute or '..' paths"),
        (_member("fine/../../escape.txt"), "absolute or '..' paths"),
        (_member("/tmp/absolute.txt"), "absolute or '..' paths"),
        (_member("link", tarfile.SYMTYPE, "/etc/passwd"), "only regular files and folders"),
        (_member("hard", tarfile.LNKTYPE, "fine/ok.txt"), "only regular files and folders"),
        (_member("fifo", tarfile.FIFOTYPE), "only regular files and folders"),
    ],
)
def test_unsafe_tar_members_are_refused_before_writing(tmp_path: Path, member, message: str) -> None:
    archive = tmp_path / "evil.tar.gz"
    _tar_with(archive, member, b"bad")
    dest = tmp_path / "out" / "inner"
    with pytest.raises(DatasetError, match=rf"evil\.tar\.gz: refusing archive member '{member.name}': {message}"):
        extract_tar(archive, dest)
    assert not (tmp_path / "out").exists() and not (tmp_path / "escape.txt").exists()


def test_truncated_archive(tmp_path: Path) -> None:
    archive = tmp_path / "cut.tar.gz"
    _tar_with(archive, _member("fine/big.bin"), bytes(range(256)) * 400)
    archive.write_bytes(archive.read_bytes()[:-40])
    with pytest.raises(DatasetError, match=r"cut\.tar\.gz: cannot extract"):
        extract_tar(archive, tmp_path / "out")
