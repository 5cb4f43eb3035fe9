"""Per-client persistent optimizer state, stored compactly (REFERENCE §4: each client keeps its
own Adam state across the rounds it takes part in), and the one serialization of an optimizer's
state that the store, the checkpoint and Flower's ``Context.state`` share.

One model and one optimizer serve every client; what differs per client is the optimizer's
state, kept here as a few flat arrays per client in memory or, for large federations, in one
file per client on disk. Nothing is stored for clients that never trained, so memory grows with
participants, not with the federation's size.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Mapping
from pathlib import Path

import numpy as np
import torch

OptimizerArrays = dict[str, np.ndarray]
"""An optimizer's per-parameter state, one array per state entry: ``"step"`` holds one float64
count per parameter; any other entry (``"exp_avg"``, ``"exp_avg_sq"`` ...) the float32 values of
every parameter concatenated in parameter order (zeros for a parameter without it)."""


def _params(optimizer: torch.optim.Optimizer) -> list[torch.Tensor]:
    return [p for group in optimizer.param_groups for p in group["params"]]


def optimizer_arrays(optimizer: torch.optim.Optimizer) -> OptimizerArrays | None:
    """``optimizer``'s state as :data:`OptimizerArrays`, or None while it has none."""
    params = _params(optimizer)
    states = [optimizer.state.get(p, {}) for p in params]
    names = sorted({k for s in states for k, v in s.items() if torch.is_tensor(v)})
    if not names:
        return None
    out = {}
    for name in names:
        if name == "step":
            out[name] = np.array([float(s.get("step", 0.0)) for s in states], np.float64)
        else:
            out[name] = np.concatenate([s[name].detach().reshape(-1).to(torch.float32).cpu().numpy() if name in s
                                        else np.zeros(p.numel(), np.float32) for p, s in zip(params, states)])
    return out


def load_optimizer_arrays(optimizer: torch.optim.Optimizer, arrays: Mapping[str, np.ndarray]) -> None:
    """Make ``arrays`` (:data:`OptimizerArrays`) ``optimizer``'s state.

    Raises:
        ValueError: an array does not fit the optimizer's parameters (the state is left unchanged).
    """
    params = _params(optimizer)
    sizes = [p.numel() for p in params]
    states: list[dict[str, torch.Tensor]] = [{} for _ in params]
    for name, array in arrays.items():
        expected = len(params) if name == "step" else sum(sizes)
        if np.shape(array) != (expected,):
            raise ValueError(f"optimizer state {name!r} has shape {np.shape(array)}, the parameters need ({expected},)")
        if name == "step":
            for state, count in zip(states, array):
                state[name] = torch.tensor(float(count), dtype=torch.float32)
        else:
            flat = torch.tensor(np.asarray(array), dtype=torch.float32)
            for state, p, part in zip(states, params, flat.split(sizes)):
                state[name] = part.to(p.device, copy=True).view_as(p)
    optimizer.state.clear()
    for p, state in zip(params, states):
        optimizer.state[p] = state


class ClientStateStore:
    """Optimizer state of each client, saved after its update and restored before the next.

    Args:
        directory: where to keep one file per client; ``None`` keeps everything in memory.
    """

    def __init__(self, directory: str | Path | None = None) -> None:
        self.directory = Path(directory) if directory is not None else None
        if self.directory is not None:
            self.directory.mkdir(parents=True, exist_ok=True)
        self._memory: dict[int, OptimizerArrays] = {}

    def __contains__(self, client: int) -> bool:
        if self.directory is None:
            return client in self._memory
        return self._path(client).exists()

    def _path(self, client: int) -> Path:
        assert self.directory is not None
        return self.directory / f"client-{client:06d}.npz"

    def save(self, client: int, optimizer: torch.optim.Optimizer) -> None:
        """Keep ``optimizer``'s current state as client ``client``'s."""
        arrays = optimizer_arrays(optimizer)
        if arrays is not None:
            self.save_arrays(client, arrays)

    def save_arrays(self, client: int, arrays: OptimizerArrays) -> None:
        """Keep ``arrays`` as client ``client``'s state; a trainer that holds no optimizer object (a
        batched cohort) saves so."""
        if self.directory is None:
            self._memory[client] = {k: np.asarray(v) for k, v in arrays.items()}
            return
        path = self._path(client)
        tmp = path.with_suffix(".tmp")
        with open(tmp, "wb") as handle:
            np.savez(handle, **arrays)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)

    def arrays(self, client: int) -> OptimizerArrays | None:
        """Client ``client``'s state, or None if it has none."""
        if client not in self:
            return None
        if self.directory is None:
            return self._memory[client]
        with np.load(self._path(client), allow_pickle=False) as data:
            return dict(data)

    def load(self, client: int, optimizer: torch.optim.Optimizer) -> None:
        """Put client ``client``'s state into ``optimizer`` (a fresh state if it has none)."""
        stored = self.arrays(client)
        if stored is None:
            optimizer.state.clear()
        else:
            load_optimizer_arrays(optimizer, stored)

    def clients(self) -> list[int]:
        """The clients that have a stored state, ascending."""
        if self.directory is None:
            return sorted(self._memory)
        return sorted(int(p.stem.split("-")[1]) for p in self.directory.glob("client-*.npz"))

    def state_dict(self) -> dict[str, torch.Tensor]:
        """The in-memory states as tensors ``<client>.<entry>``; a disk store's files are not read
        (:meth:`link_files` keeps them)."""
        return {f"{client}.{name}": torch.from_numpy(np.ascontiguousarray(array)).clone()
                for client, arrays in sorted(self._memory.items()) for name, array in arrays.items()}

    def link_files(self, folder: Path) -> None:
        """Hard-link (or copy) a disk store's files into ``folder``: the store replaces a file by
        rename, so a link keeps the contents it had here."""
        if self.directory is not None:
            _link_files(self.directory, folder)

    def load_state_dict(self, tensors: Mapping[str, torch.Tensor], files: Path | None = None) -> None:
        """Replace every client's state with those of ``tensors`` (what :meth:`state_dict` returned)
        and, for a disk store, the files in ``files`` (what :meth:`link_files` kept)."""
        self._memory = {}
        if self.directory is not None:
            for path in self.directory.glob("client-*"):
                path.unlink()
        states: dict[int, OptimizerArrays] = {}
        for key, value in tensors.items():
            client, name = key.split(".", 1)
            states.setdefault(int(client), {})[name] = value.numpy()
        for client, arrays in states.items():
            self.save_arrays(client, arrays)
        if files is not None and self.directory is not None:
            _link_files(files, self.directory)


def _link_files(source: Path, dest: Path) -> None:
    for path in sorted(source.glob("client-*.npz")):
        try:
            os.link(path, dest / path.name)
        except OSError:
            shutil.copy2(path, dest / path.name)
