"""Crash-safe checkpoints of a simulation and exact resume.

A run directory holds, next to its results:

- ``config.json``: the run's settings (``RunConfig.to_dict()``), written when the run starts;
  ``lptfl run --resume DIR`` rebuilds the run from it.
- ``checkpoint.safetensors``: the state after the last checkpointed round, one file written
  atomically (temporary file, fsync, rename, fsync of the directory). Tensors are safetensors
  records (no pickle anywhere):

  - ``global.<name>``: the server's global model,
  - ``average.<name>``: the server moving average (absent while there is none),
  - ``client.<id>.flat`` / ``client.<id>.steps``: each client's persistent optimizer state
    when the client-state store lives in memory;

  and the header's ``__metadata__["lptfl"]`` is a JSON object: format name and version, the
  round, the config fingerprint, the number of ``metrics.jsonl`` lines written up to that
  round, the simulated wall time, the client-state mode, the optimizer-state names, the
  clients with a stored state, for the disk store the snapshot directory, and the numerics record
  (:func:`lptfl.experiment.results.numerics`: torch version, device, processor, threads).
- ``checkpoint-client_state-<round>-<tag>/``: for ``--client_state disk`` only, hard links to
  the per-client files as they were at the checkpoint (the store replaces files by rename, so a
  link keeps the old contents while the live store moves on).

Resume restores all of that, truncates ``metrics.jsonl`` to the recorded line count (a round
written after the last checkpoint is run again) and goes on. Every random draw of a round
derives from ``(seed, round, client)``, so the resumed rounds are bit-identical to those of an
uninterrupted run when the numerics record is the same (same torch, device, processor and thread
count); the runner warns when it is not.
"""

from __future__ import annotations

import json
import os
import shutil
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
from safetensors.torch import load as load_tensors
from safetensors.torch import save as save_tensors

from lptfl.experiment.config import SAVED_DEFAULTS, ConfigError, RunConfig
from lptfl.experiment.results import numerics

if TYPE_CHECKING:
    from lptfl.sim.engine import Simulation

CONFIG = "config.json"
CHECKPOINT = "checkpoint.safetensors"
SNAPSHOT_PREFIX = "checkpoint-client_state-"
FORMAT = "lptfl-checkpoint"
VERSION = 1


class CheckpointError(ValueError):
    """A checkpoint or saved config is missing, damaged, or belongs to other settings."""


# --- atomic files ----------------------------------------------------------------------------


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


# --- the saved config ------------------------------------------------------------------------


def write_config(out_dir: Path, config: RunConfig) -> None:
    """Save the run's settings as ``out_dir/config.json``."""
    atomic_write(Path(out_dir) / CONFIG, (json.dumps(config.to_dict(), indent=2, sort_keys=True) + "\n").encode())


def read_config(run_dir: Path) -> RunConfig:
    """The settings saved in ``run_dir/config.json`` (a setting it predates: :data:`SAVED_DEFAULTS`)."""
    path = Path(run_dir) / CONFIG
    if not path.exists():
        raise CheckpointError(f"cannot resume {run_dir}: it has no {CONFIG} (not a run directory, or a run "
                              "started before checkpoints existed)")
    try:
        values = json.loads(path.read_bytes())
    except ValueError as err:
        raise CheckpointError(f"cannot resume {run_dir}: {path} is not valid JSON ({err})") from None
    if not isinstance(values, dict):
        raise CheckpointError(f"cannot resume {run_dir}: {path} holds no object of settings")
    return RunConfig.from_dict({**SAVED_DEFAULTS, **values}, source=str(path))


def resume_config(run_dir: Path, overrides: dict | None = None) -> RunConfig:
    """The saved settings of ``run_dir`` with ``overrides`` applied.

    Overrides may change only settings outside the fingerprint (``--compile``, ``--compile_mode``, ``--device``,
    ``--checkpoint_every``, ``--eval_every``, paths ...); anything else would make the resumed rounds a
    different experiment, and is refused with :class:`CheckpointError` naming the settings.
    """
    saved = read_config(run_dir)
    values = saved.to_dict()
    values.update(overrides or {})
    config = RunConfig.from_dict(values)
    try:
        config.validate()
    except ConfigError as err:  # a saved value out of range, unless an override put it there
        raise (err if err.key in (overrides or {}) else err.at(str(Path(run_dir) / CONFIG))) from None
    if config.fingerprint() != saved.fingerprint():
        base = saved.to_dict()
        changed = []
        for name, value in config.to_dict().items():
            if value != base[name]:
                probe = RunConfig.from_dict({**base, name: value})
                if probe.fingerprint() != saved.fingerprint():
                    changed.append(f"--{name} {base[name]!r} -> {value!r}")
        raise CheckpointError(
            f"refusing to resume {run_dir}: the given settings change the experiment "
            f"({'; '.join(changed) or 'fingerprint differs'}); resume with the run's own settings "
            "(only --compile, --compile_mode, --cohort, --cohort_size, --device, --checkpoint_every, --eval_every, "
            "--data_path, --download, --client_state may differ, "
            "and --c_rounds under a constant learning rate) "
            "or start a new run with another --out"
        )
    return config


# --- checkpoints -----------------------------------------------------------------------------


@dataclass
class Checkpoint:
    """What ``checkpoint.safetensors`` holds (see the module docstring)."""

    round: int
    metrics_lines: int
    fingerprint: str
    wall_time_s: float
    global_state: dict[str, torch.Tensor]
    average_state: dict[str, torch.Tensor] | None
    client_mode: str
    client_names: list[str] | None = None
    clients: list[int] = field(default_factory=list)
    client_memory: dict[int, tuple[np.ndarray, np.ndarray]] = field(default_factory=dict)
    snapshot: str | None = None
    algorithm_state: dict[str, torch.Tensor] = field(default_factory=dict)
    numerics: dict = field(default_factory=dict)


def _model_device(state: dict[str, torch.Tensor]) -> torch.device:
    return next(iter(state.values())).device if state else torch.device("cpu")


def _store_mode(sim: "Simulation") -> str:
    if sim.store is None:
        return "none"
    return "memory" if sim.store.directory is None else "disk"


def _snapshot_disk_store(out_dir: Path, directory: Path, round_index: int) -> str:
    """Hard-link (or copy) the store's files into a fresh snapshot directory; its name."""
    name = f"{SNAPSHOT_PREFIX}{round_index:06d}-{uuid.uuid4().hex[:8]}"
    tmp = out_dir / f".{name}.tmp"
    tmp.mkdir()
    for path in sorted(directory.glob("client-*.npz")):
        try:
            os.link(path, tmp / path.name)
        except OSError:
            shutil.copy2(path, tmp / path.name)
    fsync_dir(tmp)
    os.replace(tmp, out_dir / name)
    fsync_dir(out_dir)
    return name


def save_checkpoint(out_dir: Path, sim: "Simulation", *, metrics_lines: int) -> Path:
    """Write the state of ``sim`` after its current round, atomically; returns the file."""
    out_dir = Path(out_dir)
    server, store = sim.server, sim.store
    tensors: dict[str, torch.Tensor] = {}
    for name, value in server.global_state.items():
        tensors[f"global.{name}"] = value.detach().cpu().contiguous().clone()
    if server.average_state is not None:
        for name, value in server.average_state.items():
            tensors[f"average.{name}"] = value.detach().cpu().contiguous().clone()
    for name, value in sim.algorithm.state_dict().items():  # FedBN local state, server optimizer
        tensors[f"algorithm.{name}"] = value.detach().cpu().contiguous().clone()
    mode = _store_mode(sim)
    names, clients, snapshot = None, [], None
    if store is not None:
        names, memory = store.snapshot()
        clients = store.clients()
        for client, (flat, steps) in sorted(memory.items()):
            tensors[f"client.{client}.flat"] = torch.from_numpy(np.ascontiguousarray(flat, np.float32)).clone()
            tensors[f"client.{client}.steps"] = torch.from_numpy(np.ascontiguousarray(steps, np.float64)).clone()
        if store.directory is not None:
            snapshot = _snapshot_disk_store(out_dir, store.directory, server.round)
    meta = {
        "format": FORMAT,
        "version": VERSION,
        "round": server.round,
        "metrics_lines": int(metrics_lines),
        "fingerprint": sim.config.fingerprint(),
        "wall_time_s": sim.wall_time_s,
        "has_average": server.average_state is not None,
        "client_mode": mode,
        "client_names": names,
        "clients": clients,
        "snapshot": snapshot,
        "numerics": numerics(_model_device(server.global_state)),
    }
    path = out_dir / CHECKPOINT
    atomic_write(path, save_tensors(tensors, metadata={"lptfl": json.dumps(meta)}))
    for old in out_dir.glob(f"{SNAPSHOT_PREFIX}*"):  # snapshots no checkpoint refers to any more
        if old.name != snapshot:
            shutil.rmtree(old, ignore_errors=True)
    return path


def _header_metadata(data: bytes) -> dict:
    if len(data) < 8:
        raise CheckpointError("checkpoint file is truncated")
    size = int.from_bytes(data[:8], "little")
    if size > len(data) - 8:
        raise CheckpointError("checkpoint header is longer than the file")
    header = json.loads(data[8 : 8 + size])
    meta = (header.get("__metadata__") or {}).get("lptfl")
    if meta is None:
        raise CheckpointError("not an lptfl checkpoint (no lptfl metadata)")
    meta = json.loads(meta)
    if not isinstance(meta, dict):
        raise CheckpointError("its lptfl metadata is not a JSON object")
    return meta


def load_checkpoint(run_dir: Path) -> Checkpoint | None:
    """The checkpoint of ``run_dir``, or None if it has none."""
    path = Path(run_dir) / CHECKPOINT
    if not path.exists():
        return None
    data = path.read_bytes()
    try:
        meta = _header_metadata(data)
        tensors = load_tensors(data)
    except CheckpointError:
        raise
    except Exception as err:  # safetensors raises its own error types for damaged files
        raise CheckpointError(f"{path} is damaged: {err}") from err
    if meta.get("format") != FORMAT or meta.get("version") != VERSION:
        raise CheckpointError(f"{path}: unsupported checkpoint format {meta.get('format')!r} v{meta.get('version')}")
    try:
        return _checkpoint(meta, tensors)
    except (KeyError, TypeError, ValueError, AttributeError) as err:
        problem = f"no {err} entry" if isinstance(err, KeyError) else str(err)
        raise CheckpointError(f"{path}: its metadata is damaged ({problem}); restore the file from a copy, or "
                              "start the run again with --overwrite") from None


def _checkpoint(meta: dict, tensors: dict[str, torch.Tensor]) -> Checkpoint:
    """The :class:`Checkpoint` of a file's metadata and tensors (a missing entry: ``KeyError``)."""
    global_state, average, memory, algorithm = {}, {}, {}, {}
    for key, value in tensors.items():
        kind, _, rest = key.partition(".")
        if kind == "algorithm":
            algorithm[rest] = value
        elif kind == "global":
            global_state[rest] = value
        elif kind == "average":
            average[rest] = value
        elif kind == "client":
            client, _, part = rest.partition(".")
            flat, steps = memory.get(int(client), (None, None))
            if part == "flat":
                flat = value.numpy()
            else:
                steps = value.numpy()
            memory[int(client)] = (flat, steps)
    return Checkpoint(
        round=int(meta["round"]),
        metrics_lines=int(meta["metrics_lines"]),
        fingerprint=str(meta["fingerprint"]),
        wall_time_s=float(meta["wall_time_s"]),
        global_state=global_state,
        average_state=average if meta["has_average"] else None,
        client_mode=str(meta["client_mode"]),
        client_names=meta["client_names"],
        clients=[int(c) for c in meta["clients"]],
        client_memory=memory,
        snapshot=meta.get("snapshot"),
        algorithm_state=algorithm,
        numerics=dict(meta.get("numerics") or {}),
    )


def _check_state(label: str, loaded: dict[str, torch.Tensor], expected: dict[str, torch.Tensor]) -> None:
    if set(loaded) != set(expected):
        raise CheckpointError(f"checkpoint {label} has tensors {sorted(set(loaded) ^ set(expected))[:5]} that "
                              "do not match the model of this run")
    for name, ref in expected.items():
        value = loaded[name]
        if value.shape != ref.shape or value.dtype != ref.dtype:
            raise CheckpointError(f"checkpoint {label} tensor {name!r} is {tuple(value.shape)} {value.dtype}, "
                                  f"the model's is {tuple(ref.shape)} {ref.dtype}")


def _clear_disk_store(directory: Path) -> None:
    for path in directory.glob("client-*"):
        path.unlink()


def restore_simulation(sim: "Simulation", checkpoint: Checkpoint | None) -> None:
    """Put ``sim`` in the state the checkpoint recorded (None: the state before round 1,
    which only needs a disk store emptied of files a crashed run left)."""
    store = sim.store
    if checkpoint is None:
        if store is not None and store.directory is not None:
            _clear_disk_store(store.directory)
        return
    if checkpoint.fingerprint != sim.config.fingerprint():
        raise CheckpointError("the checkpoint belongs to other settings (config fingerprint "
                              f"{checkpoint.fingerprint}, this run's is {sim.config.fingerprint()})")
    mode = _store_mode(sim)
    if mode != checkpoint.client_mode and checkpoint.clients:
        raise CheckpointError(f"the checkpoint kept client optimizer state in {checkpoint.client_mode!r} mode but "
                              f"this run uses {mode!r}; resume with --client_state {checkpoint.client_mode}")
    server = sim.server
    _check_state("global model", checkpoint.global_state, server.global_state)
    if checkpoint.average_state is not None:
        _check_state("moving average", checkpoint.average_state, server.global_state)
    device = _model_device(server.global_state)
    # keep the model's tensor order: the wire format (and so the byte counts) follows it
    order = list(server.global_state)
    server.global_state = {k: checkpoint.global_state[k].to(device) for k in order}
    server.average_state = (
        None if checkpoint.average_state is None else {k: checkpoint.average_state[k].to(device) for k in order}
    )
    server.round = checkpoint.round
    sim.wall_time_s = checkpoint.wall_time_s
    sim.algorithm.load_state_dict(checkpoint.algorithm_state)
    if store is not None:
        store.restore(checkpoint.client_names, checkpoint.client_memory)
        if store.directory is not None:
            snapshot = Path(store.directory).parent / str(checkpoint.snapshot)
            if checkpoint.clients and (checkpoint.snapshot is None or not snapshot.is_dir()):
                raise CheckpointError(f"the checkpoint's client-state snapshot {snapshot} is missing")
            _clear_disk_store(store.directory)
            if checkpoint.clients:
                for path in sorted(snapshot.glob("client-*.npz")):
                    try:
                        os.link(path, store.directory / path.name)
                    except OSError:
                        shutil.copy2(path, store.directory / path.name)
                fsync_dir(store.directory)


def truncate_metrics(run_dir: Path, lines: int, metrics_name: str = "metrics.jsonl") -> None:
    """Cut ``metrics.jsonl`` after its first ``lines`` lines (rounds written after the checkpoint,
    or a line half-written by a crash, go)."""
    path = Path(run_dir) / metrics_name
    if not path.exists():
        if lines:
            raise CheckpointError(f"{path} is missing but the checkpoint counts {lines} lines")
        return
    data = path.read_bytes()
    end, found = 0, 0
    while found < lines:
        newline = data.find(b"\n", end)
        if newline < 0:
            raise CheckpointError(f"{path} has {found} complete lines; the checkpoint counts {lines}")
        end, found = newline + 1, found + 1
    if end != len(data):
        with open(path, "r+b") as handle:
            handle.truncate(end)
            handle.flush()
            os.fsync(handle.fileno())


def refuse_restart_without_checkpoint(run_dir: Path, metrics_name: str = "metrics.jsonl") -> None:
    """Refuse to resume ``run_dir``, which has no checkpoint, from round 0 when it must have had one.

    A run without a checkpoint restarts from the beginning and cuts ``metrics.jsonl``; that is
    right when it stopped before its first checkpoint (at most ``checkpoint_every`` rounds in),
    but with more rounds written the checkpoint was removed or lost (e.g. a fresh clone, where
    checkpoints are not committed), and restarting would throw those rounds away unannounced.

    Raises:
        CheckpointError: the run has more complete metrics lines than ``checkpoint_every``
            (its saved setting, > 0) and no checkpoint.
    """
    run_dir = Path(run_dir)
    every = read_config(run_dir).checkpoint_every
    path = run_dir / metrics_name
    lines = path.read_bytes().count(b"\n") if path.exists() else 0
    if every and lines > every:
        raise CheckpointError(
            f"cannot resume {run_dir}: {metrics_name} has {lines} rounds but {CHECKPOINT} is missing (the run "
            f"writes one every {every} round(s), so it was removed or lost); resuming would start again from "
            f"round 0 and cut those rounds: move {path} elsewhere to restart the run, or start it anew with "
            "--out and --overwrite"
        )


def remove_checkpoints(run_dir: Path) -> None:
    """Delete the checkpoint, the saved config and client-state snapshots (``--overwrite``)."""
    run_dir = Path(run_dir)
    for name in (CHECKPOINT, CONFIG):
        if (run_dir / name).exists():
            (run_dir / name).unlink()
    for old in run_dir.glob(f"{SNAPSHOT_PREFIX}*"):
        shutil.rmtree(old, ignore_errors=True)
    for old in run_dir.glob(f".{SNAPSHOT_PREFIX}*"):
        shutil.rmtree(old, ignore_errors=True)
