"""Crash-safe checkpoints of a run and exact resume.

``checkpoint.safetensors`` in the run folder (:class:`lptfl.experiment.run_dir.RunDirectory`) holds the
state after the last checkpointed round, written atomically, with no pickle anywhere. Its tensors are
the objects' own ``state_dict()``, each under a prefix:

- ``server.*``: :meth:`lptfl.fl.Server.state_dict` (global model, moving average, round, server optimizer),
- ``algorithm.*``: the FL algorithm's (FedBN's per-client batch norm, FedGen's / FedFTG's generators),
- ``store.*``: :meth:`lptfl.fl.ClientStateStore.state_dict` (the clients' optimizer state, when in memory);

and the header's ``__metadata__["lptfl"]`` is a JSON object: format name and version, the round, the
config fingerprint, the number of ``metrics.jsonl`` lines written up to that round, the simulated wall
time, the client-state mode, the clients with a stored state, for a disk store the snapshot folder
(``checkpoint-client_state-<round>-<tag>/``: hard links to its files as they were), the numerics record
(:func:`lptfl.experiment.results.numerics`: torch version, device, processor, threads), a SHA-256 digest
of every tensor (its dtype, shape and bytes) under ``tensors``, and under ``checksum`` the SHA-256 of all
the other metadata (digests included). Loading verifies both and range-checks the metadata, so a
corrupted file is refused naming the tensor or the entry.

Resume loads those state dicts back, cuts ``metrics.jsonl`` to the recorded line count (a round written
after the last checkpoint is run again) and goes on. Every random draw of a round derives from
``(seed, round, client)``, so the resumed rounds are bit-identical to those of an uninterrupted run when
the numerics record is the same (same torch, device, processor and thread count); the runner warns when
it is not.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import torch
from safetensors.torch import load as load_tensors
from safetensors.torch import save as save_tensors

from lptfl.experiment.config import SAVED_DEFAULTS, ConfigError, RunConfig
from lptfl.experiment.results import numerics
from lptfl.experiment.results import REPAIR
from lptfl.experiment.run_dir import CHECKPOINT, CONFIG, SNAPSHOT_PREFIX, CheckpointError, RunDirectory
from lptfl.fl import ClientStateStore, Server

FORMAT = "lptfl-checkpoint"
VERSION = 3  # 2: tensor digests and a metadata checksum; 3: the objects' state_dict() under server/algorithm/store
_SNAPSHOT_NAME = re.compile(re.escape(SNAPSHOT_PREFIX) + r"\d{6}-[0-9a-f]{8}")
_CLIENT_MODES = ("none", "memory", "disk")
_PARTS = ("server", "algorithm", "store")


class StateDict(Protocol):
    def state_dict(self) -> dict[str, torch.Tensor]: ...

    def load_state_dict(self, tensors: dict[str, torch.Tensor]) -> None: ...


class Run(Protocol):
    """What a driver's run shows a checkpoint: the simulator's :class:`lptfl.sim.engine.Simulation`
    and the Flower ServerApp's :class:`lptfl.flower.server_app.FlowerRun`."""

    config: RunConfig
    device: torch.device
    wall_time_s: float

    @property
    def server(self) -> Server: ...

    @property
    def algorithm(self) -> StateDict: ...

    @property
    def store(self) -> ClientStateStore | None: ...

    def resume_clock(self, wall_time_s: float) -> None: ...


# --- the saved config ------------------------------------------------------------------------


def write_config(out_dir: Path, config: RunConfig) -> None:
    """Save the run's settings as ``out_dir/config.json``."""
    RunDirectory(out_dir).write(CONFIG, (json.dumps(config.to_dict(), indent=2, sort_keys=True) + "\n").encode())


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

    Overrides may change only the settings declared resumable (:meth:`RunConfig.resumable`: ``--compile``,
    ``--device``, paths ...) and ``--c_rounds`` under a constant learning rate; anything else would make the
    resumed rounds a different experiment, and is refused with :class:`CheckpointError` naming the settings.
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
            f"(only {', '.join(f'--{name}' for name in RunConfig.resumable())} may differ, and --c_rounds under a "
            "constant learning rate) or start a new run with another --out"
        )
    return config


# --- checkpoints -----------------------------------------------------------------------------


@dataclass
class Checkpoint:
    """What ``checkpoint.safetensors`` of ``run_dir`` holds (see the module docstring); ``state`` maps
    ``server``, ``algorithm`` and ``store`` to their state dicts."""

    run_dir: Path
    round: int
    metrics_lines: int
    fingerprint: str
    wall_time_s: float
    client_mode: str
    clients: list[int]
    snapshot: str | None
    numerics: dict
    state: dict[str, dict[str, torch.Tensor]]


def _store_mode(store: ClientStateStore | None) -> str:
    if store is None:
        return "none"
    return "memory" if store.directory is None else "disk"


def save_checkpoint(out_dir: Path, sim: Run, *, metrics_lines: int) -> Path:
    """Write the state of ``sim`` after its current round, atomically; returns the file."""
    run, store = RunDirectory(out_dir), sim.store
    parts = {"server": sim.server.state_dict(), "algorithm": sim.algorithm.state_dict(),
             "store": {} if store is None else store.state_dict()}
    tensors = {f"{part}.{name}": value.detach().cpu().contiguous()
               for part, state in parts.items() for name, value in state.items()}
    snapshot = None
    if store is not None and store.directory is not None:
        snapshot = run.new_snapshot(sim.server.round, store.link_files)
    meta: dict = {
        "format": FORMAT,
        "version": VERSION,
        "round": sim.server.round,
        "metrics_lines": int(metrics_lines),
        "fingerprint": sim.config.fingerprint(),
        "wall_time_s": sim.wall_time_s,
        "client_mode": _store_mode(store),
        "clients": [] if store is None else store.clients(),
        "snapshot": snapshot,
        "numerics": numerics(sim.device),
        "tensors": {name: tensor_digest(value) for name, value in tensors.items()},
    }
    meta["checksum"] = metadata_checksum(meta)
    path = run.write(CHECKPOINT, save_tensors(tensors, metadata={"lptfl": json.dumps(meta)}))
    run.remove_snapshots(keep=snapshot)  # those no checkpoint refers to any more
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


def _header_metadata(path: Path, data: bytes) -> dict:
    """The lptfl metadata in the safetensors header of ``data`` (the bytes of ``path``)."""
    size = int.from_bytes(data[:8], "little") if len(data) >= 8 else None
    if size is None or size > len(data) - 8:
        raise CheckpointError(f"{path} is truncated (its header is cut short); {REPAIR}")
    header = json.loads(data[8 : 8 + size])
    meta = header.get("__metadata__") if isinstance(header, dict) else None
    meta = meta.get("lptfl") if isinstance(meta, dict) else None
    if meta is None:
        raise CheckpointError(f"{path} is not an lptfl checkpoint (no lptfl metadata in its header); {REPAIR}")
    meta = json.loads(meta)
    if not isinstance(meta, dict):
        raise CheckpointError(f"{path}: its lptfl metadata is not a JSON object; {REPAIR}")
    return meta


def _check_format(path: Path, meta: dict) -> None:
    """Refuse a checkpoint of another format or version, naming one an older lptfl wrote."""
    version = meta.get("version")
    if meta.get("format") == FORMAT and isinstance(version, int) and 1 <= version < VERSION:
        raise CheckpointError(f"{path} was written by an older lptfl (checkpoint format v{version}, this lptfl reads "
                              f"v{VERSION}); start the run again with --overwrite, or resume it with the lptfl that "
                              "wrote it")
    if meta.get("format") != FORMAT or version != VERSION:
        raise CheckpointError(f"{path}: unsupported checkpoint format {meta.get('format')!r} v{version}; expected "
                              f"{FORMAT!r} v{VERSION}")


def _verify(path: Path, meta: dict, tensors: dict[str, torch.Tensor]) -> None:
    """Check the metadata's checksum and every tensor's digest; a mismatch names the entry or tensor."""
    if meta.get("checksum") != metadata_checksum(meta):
        raise CheckpointError(f"{path}: its metadata fails its checksum (the file is corrupted); {REPAIR}")
    digests = meta.get("tensors")
    if not isinstance(digests, dict) or set(digests) != set(tensors):
        listed = set(digests) if isinstance(digests, dict) else set()
        raise CheckpointError(f"{path}: tensors {sorted(listed ^ set(tensors))[:5]} are not those its metadata "
                              f"lists (the file is corrupted); {REPAIR}")
    for name in sorted(tensors):
        if tensor_digest(tensors[name]) != digests[name]:
            raise CheckpointError(f"{path}: tensor {name!r} fails its checksum (the file is corrupted); {REPAIR}")


def load_checkpoint(run_dir: Path) -> Checkpoint | None:
    """The checkpoint of ``run_dir``, or None if it has none.

    Raises:
        CheckpointError: the file is damaged (a tensor or the metadata fails its checksum, an
            entry is missing or out of range), was written by an older lptfl, or is of another format.
    """
    path = Path(run_dir) / CHECKPOINT
    if not path.exists():
        return None
    data = path.read_bytes()
    try:
        meta = _header_metadata(path, data)
        _check_format(path, meta)
        tensors = load_tensors(data)
    except CheckpointError:
        raise
    except Exception as err:  # safetensors raises its own error types for damaged files
        raise CheckpointError(f"{path} is damaged: {err}") from err
    _verify(path, meta, tensors)
    try:
        return _checkpoint(Path(run_dir), meta, tensors)
    except (KeyError, TypeError, ValueError, AttributeError) as err:
        problem = f"no {err} entry" if isinstance(err, KeyError) else str(err)
        raise CheckpointError(f"{path}: its metadata is damaged ({problem}); {REPAIR}") from None


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


def _checkpoint(run_dir: Path, meta: dict, tensors: dict[str, torch.Tensor]) -> Checkpoint:
    """The :class:`Checkpoint` of a file's metadata and tensors, checked (a missing entry: ``KeyError``;
    the snapshot must be a folder name of the run folder: no path)."""
    state: dict[str, dict[str, torch.Tensor]] = {part: {} for part in _PARTS}
    for key, value in tensors.items():
        part, _, name = key.partition(".")
        if part not in state:
            raise ValueError(f"tensor {key!r} is none of {', '.join(_PARTS)}")
        state[part][name] = value
    round_index = _entry(meta, "round", int, minimum=0)
    if int(state["server"]["round"]) != round_index:
        raise ValueError(f"round is {round_index}, its server state's round is {int(state['server']['round'])}")
    mode, clients, snapshot = meta["client_mode"], meta["clients"], meta["snapshot"]
    if mode not in _CLIENT_MODES:
        raise ValueError(f"client_mode is {mode!r}, expected one of {', '.join(_CLIENT_MODES)}")
    if not isinstance(clients, list) or not all(isinstance(c, int) and not isinstance(c, bool) and c >= 0
                                                for c in clients):
        raise ValueError(f"clients is {str(clients)[:40]}, expected a list of client indices")
    if snapshot is not None and not (isinstance(snapshot, str) and _SNAPSHOT_NAME.fullmatch(snapshot)):
        raise ValueError(f"snapshot is {str(snapshot)[:60]!r}, expected a folder {SNAPSHOT_PREFIX}<round>-<tag> of "
                         "the run folder")
    return Checkpoint(
        run_dir=run_dir,
        round=round_index,
        metrics_lines=_entry(meta, "metrics_lines", int, minimum=0),
        fingerprint=_entry(meta, "fingerprint", str),
        wall_time_s=float(_entry(meta, "wall_time_s", float, minimum=0)),
        client_mode=mode,
        clients=clients,
        snapshot=snapshot,
        numerics=dict(meta.get("numerics") or {}),
        state=state,
    )


def check_resumable(run_dir: Path, checkpoint: Checkpoint, config: RunConfig) -> None:
    """Check ``checkpoint`` against the run folder before a resume changes anything there.

    The ``metrics.jsonl`` lines it counts must be complete JSON lines, the last of them its round;
    its client-state snapshot a folder inside the run folder (present when clients have a state
    on disk); an explicit ``config.client_state`` the mode it recorded.

    Raises:
        CheckpointError: naming the file and what does not match, with what to do.
    """
    run_dir = Path(run_dir)
    if config.c_rounds < checkpoint.round:
        raise CheckpointError(f"--c_rounds {config.c_rounds} is below the {checkpoint.round} rounds {run_dir} has "
                              f"done; resume with --c_rounds {checkpoint.round} or more")
    rounds = RunDirectory(run_dir).checkpointed_rounds(checkpoint.metrics_lines)
    last = rounds[-1].get("round") if rounds else 0
    if last != checkpoint.round:
        raise CheckpointError(f"{run_dir / CHECKPOINT} records round {checkpoint.round} but the {len(rounds)} lines "
                              f"of metrics.jsonl it counts end with round {last}; restore the files from a copy, "
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


def restore_run(sim: Run, checkpoint: Checkpoint | None) -> None:
    """Put ``sim`` in the state the checkpoint recorded, through the objects' ``load_state_dict()``
    (None: the state before round 1, which only needs the store emptied of what a crashed run left)."""
    store = sim.store
    if checkpoint is None:
        if store is not None:
            store.load_state_dict({})
        return
    if checkpoint.fingerprint != sim.config.fingerprint():
        raise CheckpointError("the checkpoint belongs to other settings (config fingerprint "
                              f"{checkpoint.fingerprint}, this run's is {sim.config.fingerprint()})")
    mode = _store_mode(store)
    if mode != checkpoint.client_mode and checkpoint.clients:
        raise CheckpointError(f"the checkpoint kept client optimizer state in {checkpoint.client_mode!r} mode but "
                              f"this run uses {mode!r}; resume with --client_state {checkpoint.client_mode}")
    sim.server.load_state_dict(checkpoint.state["server"])
    sim.algorithm.load_state_dict(checkpoint.state["algorithm"])
    sim.resume_clock(checkpoint.wall_time_s)
    if store is not None:
        snapshot = None if checkpoint.snapshot is None else checkpoint.run_dir / checkpoint.snapshot
        store.load_state_dict(checkpoint.state["store"], files=snapshot)


def refuse_restart_without_checkpoint(run_dir: Path) -> None:
    """Refuse to resume ``run_dir``, which has no checkpoint, from round 0 when it must have had one.

    A run without a checkpoint restarts from the beginning and cuts ``metrics.jsonl``; that is
    right when it stopped before its first checkpoint (at most ``checkpoint_every`` rounds in),
    but with more rounds written the checkpoint was removed or lost (e.g. a fresh clone, where
    checkpoints are not committed), and restarting would throw those rounds away unannounced.

    Raises:
        CheckpointError: the run has more complete metrics lines than ``checkpoint_every`` (its saved
            setting; 0, no checkpoints: any line) and no checkpoint.
    """
    run_dir = Path(run_dir)
    every = read_config(run_dir).checkpoint_every
    lines = len(RunDirectory(run_dir).metrics_lines())
    if lines > every:
        why = (f"the run writes one every {every} round(s), so it was removed or lost" if every else
               "the run was started with --checkpoint_every 0, which writes none")
        raise CheckpointError(
            f"cannot resume {run_dir}: metrics.jsonl has {lines} rounds but {CHECKPOINT} is missing ({why}); "
            f"resuming would start again from round 0 and cut those rounds: move {run_dir / 'metrics.jsonl'} "
            "elsewhere to restart the run, or start it anew with --out and --overwrite"
        )
