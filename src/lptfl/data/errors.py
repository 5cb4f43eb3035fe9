"""Errors raised by the data layer."""

from __future__ import annotations

from pathlib import Path


class DatasetError(Exception):
    """A dataset file is missing, corrupt, of the wrong format, or failed its checksum."""


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
