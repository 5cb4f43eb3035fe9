"""Errors raised by the data layer."""

from __future__ import annotations

from pathlib import Path


class DatasetError(Exception):
    """A dataset file is missing, corrupt, of the wrong format, or failed its checksum."""


class ChecksumError(DatasetError):
    """A file's md5 differs from its published one; ``load_dataset(..., download=True)`` fetches it again."""

    def __init__(self, path: Path, md5: str, expected: str) -> None:
        self.path = path
        super().__init__(
            f"{path}: md5 {md5}, expected the published {expected}; the file is damaged or not the official "
            "release: fetch it again (--download), or pass --no_verify to load it anyway"
        )


class MissingFilesError(DatasetError):
    """A file that a dataset needs is not on disk.

    ``load_dataset(..., download=True)`` reacts to this error by downloading the official release.
    """

    def __init__(self, missing: str | Path, directory: str | Path) -> None:
        self.missing = str(missing)
        self.directory = Path(directory)
        super().__init__(
            f"missing dataset file {self.missing!r} under {self.directory}. Fix: pass download=True "
            f"(command line: --download) to fetch the official release, or place the official files "
            f"at {self.directory}"
        )
