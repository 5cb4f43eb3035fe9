"""Checksummed download of the official dataset releases, and safe extraction of their tarballs.

A file is streamed into a temporary file next to its destination while its md5 is computed, fsynced,
and renamed into place only when the md5 matches; on any failure the temporary file is removed.
Set a mirror with the ``mirror`` argument or the ``LPTFL_DATA_MIRROR`` environment variable: an http(s)://
or file:// URL serving ``<mirror>/<dataset>/<filename>``, e.g. ``file:///srv/lptfl/fmnist/t10k-labels-idx1-ubyte.gz``.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import http.client
import logging
import os
import tarfile
import tempfile
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import BinaryIO

from tqdm import tqdm

from .errors import ChecksumError, DatasetError

logger = logging.getLogger(__name__)

MIRROR_ENV = "LPTFL_DATA_MIRROR"
CHUNK_BYTES = 1 << 20
TIMEOUT_S = 60.0


@dataclass(frozen=True)
class Resource:
    """One file of an official release.

    ``filename``: its name at the source and on disk; ``md5``: hex digest of the file;
    ``subdir``: folder under the data directory that holds it; ``extract_to``: for a tar archive,
    the folder under the data directory to unpack it into (None for a file used as is).
    """

    filename: str
    md5: str
    subdir: str = ""
    extract_to: str | None = None


@dataclass(frozen=True)
class Source:
    """Where a dataset's release lives: the official base URL and its files."""

    base_url: str
    resources: tuple[Resource, ...]


def _idx_release(base_url: str, subdir: str, md5s: tuple[str, str, str, str]) -> Source:
    names = ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz",
             "t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz")
    return Source(base_url, tuple(Resource(n, m, subdir) for n, m in zip(names, md5s)))


# Registry of official releases, keyed by canonical dataset name. Tests substitute entries.
SOURCES: dict[str, Source] = {
    "mnist": _idx_release(
        "https://ossci-datasets.s3.amazonaws.com/mnist/", "MNIST/raw",
        ("f68b3c2dcbeaaa9fbdd348bbdeb94873", "d53e105ee54ea40749a09fcbcd1e9432",
         "9fb629c4189551a2d022fa330f9573f3", "ec29112dd5afa0611ce80d1b7f02629c"),
    ),
    "fmnist": _idx_release(
        "http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/", "FashionMNIST/raw",
        ("8d4fb7e6c68d591d4c3dfef9ec88bf0d", "25c81989df183df01b3e8a0aad5dffbe",
         "bef4ecab320f06d8554ea6380940ec79", "bb300cfdad3c16e7a12a480ee83cd310"),
    ),
    "cifar10": Source("https://www.cs.toronto.edu/~kriz/", (
        Resource("cifar-10-binary.tar.gz", "c32a1d4ab5d03f1284b67883e8d87530", extract_to=""),)),
    "cifar100": Source("https://www.cs.toronto.edu/~kriz/", (
        Resource("cifar-100-binary.tar.gz", "03b5dce01913d631647c71ecec9e9cb8", extract_to=""),)),
    "cinic10": Source("https://datashare.ed.ac.uk/bitstream/handle/10283/3192/", (
        Resource("CINIC-10.tar.gz", "6ee4d0c996905fe93221de577967a372", extract_to="CINIC-10"),)),
}


def download_dataset(name: str, data_dir: str | Path, *, mirror: str | None = None) -> None:
    """Download (and unpack) the official release of dataset ``name`` into ``data_dir``.

    ``name`` is a canonical name (a key of SOURCES). Files already present with the right md5 are
    not fetched again; a file with another md5 is replaced once its new copy verifies. ``mirror``
    (default: env ``LPTFL_DATA_MIRROR``, else the official URL) is an http(s):// or file:// base URL
    serving ``<mirror>/<name>/<filename>``. Raises ValueError for an unknown name or a mirror that is
    not such a URL, DatasetError on a network failure, a checksum mismatch (nothing is left in place)
    or an unsafe archive member; on failure the folders it created are removed again if empty.
    """
    if name not in SOURCES:
        raise ValueError(f"no download source for dataset {name!r}; known: {', '.join(sorted(SOURCES))}")
    source = SOURCES[name]
    origin = "mirror" if mirror is not None else MIRROR_ENV
    mirror = mirror if mirror is not None else os.environ.get(MIRROR_ENV)
    if mirror and urllib.parse.urlsplit(mirror).scheme not in ("http", "https", "file"):
        uri = f" ({Path(mirror).resolve().as_uri()} for that folder)" if Path(mirror).is_dir() else ""
        raise ValueError(f"{origin}={mirror!r} is not a URL; expected http://, https:// or file:// and the "
                         f"address of a folder serving <mirror>/<dataset>/<file>{uri}")
    base_url = f"{mirror.rstrip('/')}/{name}/" if mirror else source.base_url
    root = Path(data_dir)
    new_folders = {p for r in source.resources for p in (root / r.subdir, *(root / r.subdir).parents) if not p.exists()}
    try:
        for resource in source.resources:
            path = root / resource.subdir / resource.filename
            if path.is_file() and file_md5(path) == resource.md5:
                logger.info("%s already present with the expected md5", path)
            else:
                fetch(base_url + resource.filename, path, md5=resource.md5)
            if resource.extract_to is not None:
                extract_tar(path, root / resource.extract_to)
    except BaseException:
        for folder in sorted(new_folders, key=lambda p: len(p.parts), reverse=True):
            with contextlib.suppress(OSError):  # not empty: it holds files that did verify
                folder.rmdir()
        raise


# md5 of a file as found by verify_published: (resolved path, size, mtime in ns) -> hex md5. A file
# is hashed once per process unless it changes.
_MD5_SEEN: dict[tuple[str, int, int], str] = {}


def verify_published(name: str, data_dir: str | Path) -> None:
    """Check every file of dataset ``name``'s official release present under ``data_dir`` against
    its published md5 (:data:`SOURCES`); a file is hashed once per process while its size and
    modification time stay the same. Files a release does not publish an md5 for (those unpacked
    from an archive) are not checked; an uncompressed IDX file whose ``.gz`` is absent is logged
    as unchecked, once per process.

    Raises:
        ChecksumError: a file's md5 differs, naming the file and both digests.
    """
    source = SOURCES.get(name)
    unchecked = []
    for resource in source.resources if source is not None else ():
        path = Path(data_dir) / resource.subdir / resource.filename
        if path.is_file():
            _check_md5(path, resource.md5)
        elif path.suffix == ".gz" and path.with_suffix("").is_file():
            unchecked.append(path.with_suffix(""))
    if unchecked:
        _warn_unchecked(tuple(unchecked))


@functools.cache
def _warn_unchecked(paths: tuple[Path, ...]) -> None:
    logger.warning("%s: no published md5 (only the .gz files have one); loaded unchecked. Place the official "
                   ".gz files beside them to have them checked and loaded", ", ".join(map(str, paths)))


def _check_md5(path: Path, expected: str) -> None:
    """Compare ``path``'s md5 (cached per path, size and mtime) with ``expected``."""
    stat = path.stat()
    key = (str(path.resolve()), stat.st_size, stat.st_mtime_ns)
    if key not in _MD5_SEEN:
        _MD5_SEEN[key] = file_md5(path)
    if _MD5_SEEN[key] != expected:
        raise ChecksumError(path, _MD5_SEEN[key], expected)


def file_md5(path: Path) -> str:
    """Hex md5 of the file at ``path``."""
    digest = hashlib.md5(usedforsecurity=False)
    with path.open("rb") as f:
        while chunk := f.read(CHUNK_BYTES):
            digest.update(chunk)
    return digest.hexdigest()


@contextlib.contextmanager
def _atomic_output(dest: Path, *, durable: bool) -> Iterator[BinaryIO]:
    """Yield a temporary file next to ``dest``; rename it to ``dest`` if the block succeeds.

    With ``durable`` the data and the rename are fsynced. If the block raises, the temporary file
    is deleted and ``dest`` is untouched.
    """
    dest.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(dir=dest.parent, prefix=f".{dest.name}.", suffix=".part")
    try:
        with os.fdopen(fd, "wb") as out:
            yield out
            if durable:
                out.flush()
                os.fsync(out.fileno())
        os.replace(tmp_name, dest)
    except BaseException:
        Path(tmp_name).unlink(missing_ok=True)
        raise
    if durable:
        dir_fd = os.open(dest.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)


def fetch(url: str, dest: Path, *, md5: str) -> None:
    """Stream ``url`` to ``dest`` atomically, verifying its md5 (hex) before it is put in place."""
    logger.info("downloading %s -> %s", url, dest)
    with _atomic_output(dest, durable=True) as out:
        digest = hashlib.md5(usedforsecurity=False)
        try:
            with urllib.request.urlopen(url, timeout=TIMEOUT_S) as response, tqdm(  # file:// has no .length
                total=int(response.headers.get("Content-Length", 0)) or None, unit="B", unit_scale=True,
                desc=dest.name, disable=None,
            ) as progress:
                while chunk := response.read(CHUNK_BYTES):
                    digest.update(chunk)
                    out.write(chunk)
                    progress.update(len(chunk))
        except (urllib.error.URLError, http.client.HTTPException, ConnectionError, TimeoutError) as exc:
            raise DatasetError(
                f"could not download {url}: {exc}. Check the network, set {MIRROR_ENV} to a mirror "
                f"serving <mirror>/<dataset>/<file>, or place the official file at {dest}"
            ) from exc
        if digest.hexdigest() != md5:
            raise DatasetError(
                f"checksum mismatch for {url}: md5 {digest.hexdigest()}, expected {md5}; the download "
                f"was discarded and {dest} left as it was. Retry, or use another mirror"
            )


def _safe_member_path(member: tarfile.TarInfo, archive: Path) -> PurePosixPath:
    """The member's relative path; DatasetError for absolute or ``..`` paths and non-regular entries."""
    path = PurePosixPath(member.name)
    if path.is_absolute() or ".." in path.parts:
        raise DatasetError(
            f"{archive}: refusing archive member {member.name!r}: absolute or '..' paths could write "
            "outside the data directory; the archive is not an official release"
        )
    if not (member.isfile() or member.isdir()):
        raise DatasetError(
            f"{archive}: refusing archive member {member.name!r}: only regular files and folders are "
            "allowed (no links or device files); the archive is not an official release"
        )
    return path


def extract_tar(archive: Path, dest: Path) -> None:
    """Unpack a (possibly compressed) tar ``archive`` into ``dest``.

    Every member is checked first (one streaming pass); then regular files are written through a
    temporary name each, so no partially written file ever appears under its final name.
    """
    logger.info("extracting %s -> %s", archive, dest)
    try:
        with tarfile.open(archive, "r|*") as tar:
            for member in tar:
                _safe_member_path(member, archive)
        with tarfile.open(archive, "r|*") as tar:
            for member in tar:
                relative = _safe_member_path(member, archive)
                if member.isfile():
                    source = tar.extractfile(member)
                    assert source is not None  # regular files always have content
                    with _atomic_output(dest.joinpath(*relative.parts), durable=False) as out:
                        while chunk := source.read(CHUNK_BYTES):
                            out.write(chunk)
    except (tarfile.TarError, EOFError, OSError) as exc:
        raise DatasetError(f"{archive}: cannot extract ({exc}); delete it and download again") from exc
