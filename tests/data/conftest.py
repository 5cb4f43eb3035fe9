"""Fixtures for the data-layer tests: writers of tiny files in the official formats, a local HTTP server."""

from __future__ import annotations

import functools
import gzip
import http.server
import io
import pickle
import struct
import threading
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from lptfl.data import cifar
from lptfl.data.cinic import CLASSES as CINIC_CLASSES

Splits = tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]
_CIFAR10_BATCHES = [f"data_batch_{i}" for i in range(1, 6)]
CIFAR_LAYOUT = {  # (classes, release) -> (folder, train files, test files)
    (10, "binary"): ("cifar-10-batches-bin", [f"{b}.bin" for b in _CIFAR10_BATCHES], ["test_batch.bin"]),
    (100, "binary"): ("cifar-100-binary", ["train.bin"], ["test.bin"]),
    (10, "python"): ("cifar-10-batches-py", _CIFAR10_BATCHES, ["test_batch"]),
    (100, "python"): ("cifar-100-python", ["train"], ["test"]),
}


def idx_bytes(array: np.ndarray) -> bytes:
    """Encode a uint8 array as an IDX file (magic 0x0000 08 <ndim>, big-endian uint32 sizes, data)."""
    header = bytes([0, 0, 0x08, array.ndim]) + np.asarray(array.shape, dtype=">u4").tobytes()
    return header + np.ascontiguousarray(array, dtype=np.uint8).tobytes()


class Python2StylePickler(pickle._Pickler):  # type: ignore[name-defined]
    """Protocol-2 pickler that writes bytes as Python 2 ``str`` (BINSTRING) and names numpy's
    rebuild function ``numpy.core.multiarray``, as in the official CIFAR python release."""

    dispatch = pickle._Pickler.dispatch.copy()  # type: ignore[attr-defined]

    def save_bytes(self, obj: bytes) -> None:
        if len(obj) < 256:
            self.write(pickle.SHORT_BINSTRING + bytes([len(obj)]) + obj)
        else:
            self.write(pickle.BINSTRING + struct.pack("<i", len(obj)) + obj)
        self.memoize(obj)

    dispatch[bytes] = save_bytes


def python2_style_pickle(obj: object) -> bytes:
    buffer = io.BytesIO()
    Python2StylePickler(buffer, protocol=2).dump(obj)
    return buffer.getvalue().replace(b"numpy._core.multiarray\n", b"numpy.core.multiarray\n")


class OfficialFiles:
    """Writes tiny datasets in the official on-disk formats; returns the arrays written. A CIFAR
    writer sets the loader's expected records per file to its own ``per_file``."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.rng = np.random.default_rng(1234)
        self.monkeypatch = monkeypatch

    def _images(self, n: int, shape: tuple[int, ...]) -> np.ndarray:
        return self.rng.integers(0, 256, size=(n, *shape), dtype=np.uint8)

    def _labels(self, n: int, num_classes: int) -> np.ndarray:
        return self.rng.integers(0, num_classes, size=n).astype(np.int64)

    def mnist(self, raw_dir: Path, *, gz: bool = True, n_train: int = 12, n_test: int = 6) -> Splits:
        """IDX files in ``raw_dir`` (gzipped or not); images (N, 1, 28, 28) uint8."""
        raw_dir.mkdir(parents=True, exist_ok=True)
        splits = []
        for prefix, n in (("train", n_train), ("t10k", n_test)):
            x, y = self._images(n, (28, 28)), self._labels(n, 10)
            for name, array in ((f"{prefix}-images-idx3-ubyte", x), (f"{prefix}-labels-idx1-ubyte", y)):
                data = idx_bytes(array)
                if gz:
                    (raw_dir / f"{name}.gz").write_bytes(gzip.compress(data))
                else:
                    (raw_dir / name).write_bytes(data)
            splits += [x[:, None], y]
        return tuple(splits)  # type: ignore[return-value]

    def _cifar(self, root: Path, num_classes: int, release: str, per_file: int, encode) -> Splits:
        """Write every file of a CIFAR release; ``encode(images, labels)`` gives one file's bytes."""
        folder, train, test = CIFAR_LAYOUT[(num_classes, release)]
        (root / folder).mkdir(parents=True, exist_ok=True)
        self.monkeypatch.setitem(cifar.RECORDS_PER_FILE, num_classes, (per_file, per_file))
        out = []
        for names in (train, test):
            xs, ys = [], []
            for name in names:
                x, y = self._images(per_file, (3, 32, 32)), self._labels(per_file, num_classes)
                (root / folder / name).write_bytes(encode(x, y))
                xs.append(x)
                ys.append(y)
            out += [np.concatenate(xs), np.concatenate(ys)]
        return tuple(out)  # type: ignore[return-value]

    def cifar_binary(self, root: Path, num_classes: int, *, per_file: int = 3) -> Splits:
        """The binary release under ``root``; CIFAR-100 records carry a coarse and a fine label."""

        def encode(x: np.ndarray, y: np.ndarray) -> bytes:
            label_columns = [y] if num_classes == 10 else [y // 5, y]
            labels = np.stack(label_columns, 1).astype(np.uint8)
            return np.concatenate([labels, x.reshape(len(x), -1)], 1).tobytes()

        return self._cifar(root, num_classes, "binary", per_file, encode)

    def cifar_python(self, root: Path, num_classes: int, *, per_file: int = 3, protocol: int | None = None) -> Splits:
        """The python release under ``root``; ``protocol=None``: Python-2 style, like the official files."""
        key = "labels" if num_classes == 10 else "fine_labels"

        def encode(x: np.ndarray, y: np.ndarray) -> bytes:
            batch = {"batch_label": "tiny batch", "data": x.reshape(len(x), -1), key: y.tolist(),
                     "filenames": [f"img_{i}.png" for i in range(len(x))]}
            return python2_style_pickle(batch) if protocol is None else pickle.dumps(batch, protocol=protocol)

        return self._cifar(root, num_classes, "python", per_file, encode)

    def cinic(self, root: Path, *, per_class: int = 1) -> Splits:
        """``root/CINIC-10/{train,test}/<class>/*.png``, 32x32 RGB; arrays in the loader's order."""
        out = []
        for split in ("train", "test"):
            xs, ys = [], []
            for label, name in enumerate(CINIC_CLASSES):
                folder = root / "CINIC-10" / split / name
                folder.mkdir(parents=True, exist_ok=True)
                for i in range(per_class):
                    x = self._images(1, (32, 32, 3))[0]
                    Image.fromarray(x, "RGB").save(folder / f"{name}-{i}.png")
                    xs.append(x.transpose(2, 0, 1))
                    ys.append(label)
            out += [np.stack(xs), np.asarray(ys, dtype=np.int64)]
        return tuple(out)  # type: ignore[return-value]


@pytest.fixture
def official(monkeypatch: pytest.MonkeyPatch) -> OfficialFiles:
    """Writers of tiny files in the official formats. They are not the official release, so the
    published md5s are withheld (SOURCES emptied; a test registers the files it serves)."""
    from lptfl.data import download

    monkeypatch.setattr(download, "SOURCES", {})
    return OfficialFiles(monkeypatch)


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, format: str, *args: object) -> None:
        pass


@pytest.fixture
def http_root(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[tuple[Path, str]]:
    """A folder served over HTTP on 127.0.0.1 from a thread: yields (folder, base URL)."""
    folder = tmp_path / "www"
    folder.mkdir()
    monkeypatch.setenv("no_proxy", "127.0.0.1")
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(_QuietHandler, directory=str(folder)))
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    try:
        yield folder, f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()
        thread.join()
