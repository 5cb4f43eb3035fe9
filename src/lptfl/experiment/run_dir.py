"""A run's folder: the names of its files, durable writes, preparing it for a run, and cutting its
metrics back to a checkpoint's.

- ``config.json``: the run's settings, written when it starts (``lptfl run --resume`` rebuilds it);
- ``metrics.jsonl``: one JSON object per round, each line fsynced as it is appended;
- ``summary.json`` and ``curves.png``: the rounds so far, written when the run ends or is stopped;
- ``checkpoint.safetensors``: the state after the last checkpointed round (:mod:`lptfl.experiment.checkpoint`);
- ``client_state/``: a disk client-state store, and ``checkpoint-client_state-<round>-<tag>/`` its
  files as they were at the checkpoint;
- ``.replaced/``: the run that ``--overwrite`` replaces, kept until the new run has written round 1
  (put back if it fails before).

Every file but ``metrics.jsonl`` is written whole and atomically (temporary file, fsync, rename,
fsync of the folder): a crash leaves the old file or the new one.
"""

from __future__ import annotations

import fcntl
import json
import os
import shutil
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict
from pathlib import Path

from lptfl.experiment.results import CURVES, METRICS, REPAIR, SUMMARY, RoundMetrics

CONFIG = "config.json"
CHECKPOINT = "checkpoint.safetensors"
CLIENT_STATE = "client_state"
SNAPSHOT_PREFIX = "checkpoint-client_state-"
REPLACED = ".replaced"
MOVING = ".replaced.tmp"  # a replaced run's files while they move between the folder and REPLACED
RUN_FILES = (METRICS, SUMMARY, CURVES, CONFIG, CHECKPOINT)  # any of them: the folder holds a run
TENSORBOARD, WANDB = "tensorboard", "wandb"  # what --log writes into the run folder (wandb names its own)


class CheckpointError(ValueError):
    """A checkpoint or saved config is missing, damaged, or belongs to other settings."""


class OutputExistsError(ValueError):
    """The output directory already holds a run, or is a file."""


def fsync_dir(directory: Path) -> None:
    """Make a rename inside ``directory`` durable (no-op where directories cannot be opened)."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def atomic_write(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` so that a crash leaves either the old file or the new one."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    fsync_dir(path.parent)


class RunDirectory:
    """The folder ``path`` of one run (see the module docstring)."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self._created: Path | None = None  # the outermost folder locked() made for this run

    def write(self, name: str, data: bytes) -> Path:
        """Write the file ``name`` atomically; its path."""
        atomic_write(self.path / name, data)
        return self.path / name

    def append_metrics(self, metrics: RoundMetrics) -> None:
        """Append one round's line to ``metrics.jsonl`` and flush it to disk."""
        with open(self.path / METRICS, "a", encoding="utf-8") as handle:
            handle.write(json.dumps(asdict(metrics)) + "\n")
            handle.flush()
            os.fsync(handle.fileno())
        shutil.rmtree(self.path / REPLACED, ignore_errors=True)  # the new run has a round: the old one goes

    def write_summary(self, summary: dict) -> None:
        """Write ``summary.json`` atomically."""
        self.write(SUMMARY, (json.dumps(summary, indent=2) + "\n").encode())

    def metrics_lines(self) -> list[bytes]:
        """The complete lines of ``metrics.jsonl`` (a line half-written by a crash is not one)."""
        path = self.path / METRICS
        return path.read_bytes().split(b"\n")[:-1] if path.exists() else []

    def checkpointed_rounds(self, lines: int) -> list[dict]:
        """The first ``lines`` rounds of ``metrics.jsonl``, each a JSON object.

        Raises:
            CheckpointError: the file has fewer complete lines, or one of them is no JSON object
                (damage that resuming cannot repair, since the checkpoint counts that round).
        """
        path, kept = self.path / METRICS, self.metrics_lines()[:lines]
        if len(kept) < lines:
            state = f"has {len(kept)} complete lines" if path.exists() else "is missing"
            raise CheckpointError(f"{path} {state}; the checkpoint counts {lines}; {REPAIR}")
        rounds = []
        for number, line in enumerate(kept, start=1):
            try:
                value = json.loads(line)
            except ValueError:
                value = None
            if not isinstance(value, dict):
                raise CheckpointError(f"{path} line {number} is damaged and the checkpoint counts it, so resuming "
                                      f"cannot repair it; {REPAIR}")
            rounds.append(value)
        return rounds

    def truncate_metrics(self, lines: int) -> None:
        """Cut ``metrics.jsonl`` after its first ``lines`` lines (rounds written after the checkpoint,
        or a line half-written by a crash, go).

        Raises:
            CheckpointError: as :meth:`checkpointed_rounds`.
        """
        self.checkpointed_rounds(lines)
        path, end = self.path / METRICS, sum(len(line) + 1 for line in self.metrics_lines()[:lines])
        if path.exists() and end != path.stat().st_size:
            with open(path, "r+b") as handle:
                handle.truncate(end)
                handle.flush()
                os.fsync(handle.fileno())

    def remove_results(self) -> None:
        """Delete ``summary.json`` and ``curves.png`` (stale once a resumed run goes on)."""
        for name in (SUMMARY, CURVES):
            (self.path / name).unlink(missing_ok=True)

    def _outermost_missing(self) -> Path | None:
        """The outermost folder of the path that does not exist yet (None: the folder exists)."""
        return next((folder for folder in reversed((self.path, *self.path.parents)) if not folder.exists()), None)

    def _make(self) -> Path | None:
        """Create the folder and its missing parents; the outermost folder it created (None: it existed).

        Raises:
            OutputExistsError: the path is a file, or the folder cannot be created (the reason named).
        """
        try:
            if self.path.exists() and not self.path.is_dir():
                raise OutputExistsError(f"--out {self.path} is a file, not a directory; choose another --out")
            created = self._outermost_missing()
            self.path.mkdir(parents=True, exist_ok=True)
        except OSError as err:  # e.g. no permission to look into or write a parent
            raise OutputExistsError(f"cannot create --out {self.path}: {err.strerror or err}; choose another --out") \
                from None
        return created

    @contextmanager
    def locked(self) -> Iterator[None]:
        """Hold the folder for this process for the length of the block (an advisory ``flock`` on the
        folder, created if missing), so that two runs never write into one folder at once.

        Raises:
            OutputExistsError: another process holds the folder, or the path is a file.
        """
        self._created = self._make()
        fd = os.open(self.path, os.O_RDONLY)
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                raise OutputExistsError(f"{self.path} is in use by another lptfl process; wait for it to end or "
                                        "choose another --out") from None
            self._recover()
            yield
        finally:
            os.close(fd)

    def _snapshots(self) -> list[Path]:
        """The client-state snapshot folders (and unfinished ones)."""
        return [*self.path.glob(f"{SNAPSHOT_PREFIX}*"), *self.path.glob(f".{SNAPSHOT_PREFIX}*")]

    def _run_files(self) -> list[Path]:
        """What a run puts in the folder: :data:`RUN_FILES`, its client-state store and snapshots, its
        tracker's files."""
        names = (*RUN_FILES, CLIENT_STATE, TENSORBOARD, WANDB)
        return [*(self.path / name for name in names if (self.path / name).exists()),
                *self._snapshots()]

    def _remove_run_files(self) -> None:
        for item in self._run_files():
            if item.is_dir():
                shutil.rmtree(item)
            else:
                item.unlink()

    def _put_back(self, folder: Path) -> None:
        """Move the files of ``folder`` (a run set aside) back into the run folder, then remove it."""
        for item in folder.iterdir():
            os.replace(item, self.path / item.name)
        folder.rmdir()
        fsync_dir(self.path)

    def _recover(self) -> None:
        """Finish what a process killed while moving a replaced run left: files half-way between the
        folder and ``.replaced/`` (in ``.replaced.tmp/``) go back; ``.replaced/`` goes once the new
        run has written round 1."""
        if (self.path / MOVING).exists():
            self._put_back(self.path / MOVING)
        if (self.path / REPLACED).exists() and (self.path / METRICS).exists():
            shutil.rmtree(self.path / REPLACED)

    def prepare(self, *, overwrite: bool) -> Path | None:
        """Create the folder for a new run; refuse one that holds a run unless ``overwrite``. A run with
        rounds is then set aside in ``.replaced/`` until the new run writes round 1 (:meth:`abandon`
        puts it back); files of a run that never wrote a round are removed. Returns the outermost
        folder it created (None: the folder existed).

        Raises:
            OutputExistsError: the path is a file, or holds a run and ``overwrite`` is false.
        """
        created = self._created or self._make()
        self._recover()
        aside = self.path / REPLACED
        if aside.exists() and not overwrite:
            self.abandon()  # a replacement killed before round 1: the run it replaced is the folder's run again
        existing = [name for name in RUN_FILES if (self.path / name).exists()]
        if existing and not overwrite:
            raise OutputExistsError(f"{self.path} already holds a run ({', '.join(existing)}); pass --overwrite to "
                                    "replace it, --resume to continue it, or choose another --out")
        if aside.exists() or not any((self.path / name).exists() for name in (METRICS, CHECKPOINT)):
            self._remove_run_files()  # leftovers of a run (or a replacement) that wrote no round
        else:
            moving = self.path / MOVING
            moving.mkdir()
            for item in self._run_files():
                os.replace(item, moving / item.name)
            fsync_dir(moving)
            os.replace(moving, aside)  # a crash before this line leaves MOVING, which _recover() puts back
            fsync_dir(self.path)
        return created

    def abandon(self) -> None:
        """Undo a new run that wrote no round: remove what it put here and put back the run it
        replaced (``.replaced/``), so that the corrected command finds the folder as it was. A run
        that wrote a round stays."""
        self._recover()
        if (self.path / METRICS).exists():
            return
        self._remove_run_files()
        if (self.path / REPLACED).exists():
            os.replace(self.path / REPLACED, self.path / MOVING)  # from here a crash is finished by _recover()
            self._put_back(self.path / MOVING)

    @contextmanager
    def new_run(self, *, overwrite: bool) -> Iterator[None]:
        """:meth:`prepare` the folder; when the body fails before round 1's metrics are written,
        :meth:`abandon` the run and remove the folders made for it."""
        created = self.prepare(overwrite=overwrite)
        try:
            yield
        except BaseException:
            if not (self.path / METRICS).exists():
                self.abandon()
                for folder in (self.path, *self.path.parents) if created is not None else ():
                    if not folder.is_dir() or any(folder.iterdir()):
                        break
                    folder.rmdir()
                    if folder == created:
                        break
            raise

    def new_snapshot(self, round_index: int, fill: Callable[[Path], None]) -> str:
        """A new client-state snapshot folder of round ``round_index``: ``fill(folder)`` puts the files
        in, then it is made durable under its final name, which is returned."""
        name = f"{SNAPSHOT_PREFIX}{round_index:06d}-{uuid.uuid4().hex[:8]}"
        tmp = self.path / f".{name}.tmp"
        tmp.mkdir()
        fill(tmp)
        fsync_dir(tmp)
        os.replace(tmp, self.path / name)
        fsync_dir(self.path)
        return name

    def remove_snapshots(self, keep: str | None = None) -> None:
        """Delete the client-state snapshots (and unfinished ones) but ``keep``."""
        for old in self._snapshots():
            if old.name != keep:
                shutil.rmtree(old, ignore_errors=True)
