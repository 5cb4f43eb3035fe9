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
  clients with a stored state, for the disk store the snapshot directory, the numerics record
  (:func:`lptfl.experiment.results.numerics`: torch version, device, processor, threads), a
  SHA-256 digest of every tensor (its dtype, shape and bytes) under ``tensors``, and under
  ``checksum`` the SHA-256 of all the other metadata (digests included). Loading verifies both and
  range-checks the metadata, so a corrupted file is refused naming the tensor or the entry.
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

import hashlib
import json
import math
import os
import re
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
VERSION = 2  # 2: tensor digests and a metadata checksum
_SNAPSHOT_NAME = re.compile(re.escape(SNAPSHOT_PREFIX) + r"\d{6}-[0-9a-f]{8}")
_CLIENT_MODES = ("none", "memory", "disk")


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
            "--data_path, --download, --no_verify, --client_state may differ, "
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
    meta: dict = {
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
        "tensors": {name: tensor_digest(value) for name, value in tensors.items()},
    }
    meta["checksum"] = metadata_checksum(meta)
    path = out_dir / CHECKPOINT
    atomic_write(path, save_tensors(tensors, metadata={"lptfl": json.dumps(meta)}))
    for old in out_dir.glob(f"{SNAPSHOT_PREFIX}*"):  # snapshots no checkpoint refers to any more
        if old.name != snapshot:
            shutil.rmtree(old, ignore_errors=True)
    return path


def tensor_digest(tensor: torch.Tensor) -> str:
    """SHA-256 (hex) of a contiguous CPU tensor's dtype, shape and bytes."""
    digest = hashlib.sha256(f"{tensor.dtype} {tuple(tensor.shape)}".encode())
    digest.update(tensor.reshape(-1).view(torch.uint8).numpy())
    return digest.hexdigest()


def metadata_checksum(meta: dict) -> str:
    """SHA-256 (hex) of a checkpoint's metadata without its ``checksum`` entry (keys sorted)."""
    rest = {key: value for key, value in meta.items() if key != "checksum"}
    return hashlib.sha256(json.dumps(rest, sort_keys=True).encode()).hexdigest()


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


def _check_format(path: Path, meta: dict) -> None:
    """Refuse a checkpoint of another format or version, naming one that predates checksums."""
    if meta.get("format") == FORMAT and meta.get("version") == 1:
        raise CheckpointError(f"{path} predates checkpoint checksums (format v1, this lptfl reads v{VERSION}) and "
                              "cannot be verified; start the run again with --overwrite, or resume it with the "
                              "lptfl that wrote it")
    if meta.get("format") != FORMAT or meta.get("version") != VERSION:
        raise CheckpointError(f"{path}: unsupported checkpoint format {meta.get('format')!r} "
                              f"v{meta.get('version')}; expected {FORMAT!r} v{VERSION}")


def _verify(path: Path, meta: dict, tensors: dict[str, torch.Tensor]) -> None:
    """Check the metadata's checksum and every tensor's digest; a mismatch names the entry or tensor."""
    advice = "restore the file from a copy, or start the run again with --overwrite"
    if meta.get("checksum") != metadata_checksum(meta):
        raise CheckpointError(f"{path}: its metadata fails its checksum (the file is corrupted); {advice}")
    digests = meta.get("tensors")
    if not isinstance(digests, dict) or set(digests) != set(tensors):
        listed = set(digests) if isinstance(digests, dict) else set()
        raise CheckpointError(f"{path}: tensors {sorted(listed ^ set(tensors))[:5]} are not those its metadata "
                              f"lists (the file is corrupted); {advice}")
    for name in sorted(tensors):
        if tensor_digest(tensors[name]) != digests[name]:
            raise CheckpointError(f"{path}: tensor {name!r} fails its checksum (the file is corrupted); {advice}")


def load_checkpoint(run_dir: Path) -> Checkpoint | None:
    """The checkpoint of ``run_dir``, or None if it has none.

    Raises:
        CheckpointError: the file is damaged (a tensor or the metadata fails its checksum, an
            entry is missing or out of range), predates checksums, or is of another format.
    """
    path = Path(run_dir) / CHECKPOINT
    if not path.exists():
        return None
    data = path.read_bytes()
    try:
        meta = _header_metadata(data)
        _check_format(path, meta)
        tensors = load_tensors(data)
    except CheckpointError:
        raise
    except Exception as err:  # safetensors raises its own error types for damaged files
        raise CheckpointError(f"{path} is damaged: {err}") from err
    _verify(path, meta, tensors)
    try:
        return _checkpoint(meta, tensors)
    except (KeyError, TypeError, ValueError, AttributeError) as err:
        problem = f"no {err} entry" if isinstance(err, KeyError) else str(err)
        raise CheckpointError(f"{path}: its metadata is damaged ({problem}); restore the file from a copy, or "
                              "start the run again with --overwrite") from None


def _entry(meta: dict, key: str, kind: type, *, minimum: float | None = None) -> object:
    """``meta[key]``, which must be of type ``kind`` (an int for a float; never a bool), finite and at
    least ``minimum``.

    Raises:
        KeyError: the entry is missing.
        ValueError: it has another type, or is out of range.
    """
    value = meta[key]
    kinds = (int, float) if kind is float else (kind,)
    valid = isinstance(value, kinds) and not isinstance(value, bool)
    if valid and kind is float:
        valid = math.isfinite(value)
    if not valid or (minimum is not None and value < minimum):
        bound = f" >= {minimum}" if minimum is not None else ""
        raise ValueError(f"{key} is {value!r}, expected a {kind.__name__}{bound}")
    return value


def _client_entries(meta: dict) -> tuple[str, list[int], str | None]:
    """The client-state mode, the clients with a state and the snapshot name of ``meta``, checked
    (the snapshot must be a folder name of the run folder: no path)."""
    mode, clients, snapshot = meta["client_mode"], meta["clients"], meta["snapshot"]
    if mode not in _CLIENT_MODES:
        raise ValueError(f"client_mode is {mode!r}, expected one of {', '.join(_CLIENT_MODES)}")
    if not isinstance(clients, list) or not all(isinstance(c, int) and not isinstance(c, bool) and c >= 0
                                                for c in clients):
        raise ValueError(f"clients is {str(clients)[:40]}, expected a list of client indices")
    if snapshot is not None and not (isinstance(snapshot, str) and _SNAPSHOT_NAME.fullmatch(snapshot)):
        raise ValueError(f"snapshot is {str(snapshot)[:60]!r}, expected a folder {SNAPSHOT_PREFIX}<round>-<tag> of "
                         "the run folder")
    return mode, clients, snapshot


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
    mode, clients, snapshot = _client_entries(meta)
    return Checkpoint(
        round=_entry(meta, "round", int, minimum=0),
        metrics_lines=_entry(meta, "metrics_lines", int, minimum=0),
        fingerprint=_entry(meta, "fingerprint", str),
        wall_time_s=float(_entry(meta, "wall_time_s", float, minimum=0)),
        global_state=global_state,
        average_state=average if meta["has_average"] else None,
        client_mode=mode,
        client_names=meta["client_names"],
        clients=clients,
        client_memory=memory,
        snapshot=snapshot,
        algorithm_state=algorithm,
        numerics=dict(meta.get("numerics") or {}),
    )


def check_resumable(run_dir: Path, checkpoint: Checkpoint, config: RunConfig,
                    metrics_name: str = "metrics.jsonl") -> None:
    """Check ``checkpoint`` against the run folder before a resume changes anything there.

    The ``metrics.jsonl`` lines it counts must be complete JSON lines, the last of them its round;
    its client-state snapshot a folder inside the run folder (present when clients have a state
    on disk); an explicit ``config.client_state`` the mode it recorded.

    Raises:
        CheckpointError: naming the file and what does not match, with what to do.
    """
    run_dir = Path(run_dir)
    rounds = _kept_rounds(run_dir / metrics_name, checkpoint.metrics_lines)
    last = rounds[-1].get("round") if rounds else 0
    if last != checkpoint.round:
        raise CheckpointError(f"{run_dir / CHECKPOINT} records round {checkpoint.round} but the {len(rounds)} lines "
                              f"of {metrics_name} it counts end with round {last}; restore the files from a copy, "
                              "or start the run again with --overwrite")
    if checkpoint.snapshot is not None:
        folder = run_dir / checkpoint.snapshot
        if folder.is_symlink() or not folder.resolve().is_relative_to(run_dir.resolve()):
            raise CheckpointError(f"{run_dir / CHECKPOINT}: its client-state snapshot {folder} lies outside the "
                                  "run folder; restore the files from a copy, or start the run again with --overwrite")
    if checkpoint.client_mode == "disk" and checkpoint.clients and (
            checkpoint.snapshot is None or not (run_dir / checkpoint.snapshot).is_dir()):
        raise CheckpointError(f"the checkpoint's client-state snapshot {run_dir / str(checkpoint.snapshot)} is "
                              "missing; restore it from a copy, or start the run again with --overwrite")
    if config.client_state in _CLIENT_MODES and config.client_state != checkpoint.client_mode and checkpoint.clients:
        raise CheckpointError(f"the checkpoint kept client optimizer state in {checkpoint.client_mode!r} mode but "
                              f"this run uses {config.client_state!r}; resume with --client_state "
                              f"{checkpoint.client_mode}")


def _kept_rounds(path: Path, lines: int) -> list[dict]:
    """The first ``lines`` lines of ``path`` (a run's ``metrics.jsonl``), each a JSON object.

    Raises:
        CheckpointError: the file has fewer complete lines, or one of them is no JSON object
            (damage that resuming cannot repair, since the checkpoint counts that round).
    """
    data = path.read_bytes() if path.exists() else b""
    kept = data.split(b"\n")[:-1][:lines]  # the complete lines, up to the checkpoint's count
    if len(kept) < lines:
        state = "missing" if not path.exists() else f"{len(kept)} complete lines"
        raise CheckpointError(f"{path} has {state}; the checkpoint counts {lines}; restore it from a copy, or start "
                              "the run again with --overwrite")
    rounds = []
    for number, line in enumerate(kept, start=1):
        try:
            value = json.loads(line)
        except ValueError:
            value = None
        if not isinstance(value, dict):
            raise CheckpointError(f"{path} line {number} is damaged and the checkpoint counts it, so resuming cannot "
                                  "repair it; restore the file from a copy, or start the run again with --overwrite")
        rounds.append(value)
    return rounds


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
