"""Per-client persistent optimizer state, stored compactly (REFERENCE §4: each client keeps its
own Adam state across the rounds it takes part in).

One model and one optimizer serve every client; what differs per client is the optimizer's
state, kept here as one flat float32 vector per client (plus step counts) in memory or, for
large federations, in one file per client on disk. Nothing is stored for clients that never
trained, so memory grows with participants, not with the federation's size.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch


def _flatten(optimizer: torch.optim.Optimizer) -> tuple[np.ndarray, np.ndarray] | None:
    """(flat float32 tensors, step counts) of the optimizer's per-parameter state, or None if empty."""
    params = [p for group in optimizer.param_groups for p in group["params"]]
    if not any(p in optimizer.state for p in params):
        return None
    names = sorted({k for p in params for k, v in optimizer.state.get(p, {}).items() if torch.is_tensor(v)})
    chunks, steps = [], []
    for p in params:
        state = optimizer.state.get(p, {})
        for name in names:
            value = state.get(name)
            if name == "step":
                steps.append(float(value) if value is not None else 0.0)
            elif value is None:
                chunks.append(np.zeros(p.numel(), dtype=np.float32))
            else:
                chunks.append(value.detach().reshape(-1).to(torch.float32).cpu().numpy())
    return np.concatenate(chunks) if chunks else np.zeros(0, np.float32), np.asarray(steps, np.float64)


def _unflatten(optimizer: torch.optim.Optimizer, names: list[str], flat: np.ndarray, steps: np.ndarray) -> None:
    params = [p for group in optimizer.param_groups for p in group["params"]]
    optimizer.state.clear()
    offset, step_index = 0, 0
    for p in params:
        state: dict[str, torch.Tensor] = {}
        for name in names:
            if name == "step":
                state["step"] = torch.tensor(steps[step_index], dtype=torch.float32)
                step_index += 1
            else:
                n = p.numel()
                state[name] = torch.from_numpy(flat[offset : offset + n].copy()).view_as(p).to(p.device)
                offset += n
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
        self._memory: dict[int, tuple[np.ndarray, np.ndarray]] = {}
        self._names: list[str] | None = None

    def __contains__(self, client: int) -> bool:
        if self.directory is None:
            return client in self._memory
        return self._path(client).exists()

    def _path(self, client: int) -> Path:
        assert self.directory is not None
        return self.directory / f"client-{client:06d}.npz"

    @property
    def nbytes(self) -> int:
        """Bytes held in memory by the store."""
        return sum(flat.nbytes + steps.nbytes for flat, steps in self._memory.values())

    def save(self, client: int, optimizer: torch.optim.Optimizer) -> None:
        """Keep ``optimizer``'s current state as client ``client``'s."""
        flat = _flatten(optimizer)
        if flat is None:
            return
        if self._names is None:
            params = [p for g in optimizer.param_groups for p in g["params"]]
            self._names = sorted({k for p in params for k, v in optimizer.state.get(p, {}).items() if torch.is_tensor(v)})
        self._put(client, flat)

    def _put(self, client: int, flat: tuple[np.ndarray, np.ndarray]) -> None:
        if self.directory is None:
            self._memory[client] = flat
            return
        path = self._path(client)
        tmp = path.with_suffix(".tmp")
        with open(tmp, "wb") as handle:
            np.savez(handle, flat=flat[0], steps=flat[1])
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)

    def clients(self) -> list[int]:
        """The clients that have a stored state, ascending."""
        if self.directory is None:
            return sorted(self._memory)
        return sorted(int(p.stem.split("-")[1]) for p in self.directory.glob("client-*.npz"))

    def snapshot(self) -> tuple[list[str] | None, dict[int, tuple[np.ndarray, np.ndarray]]]:
        """(state names, in-memory states by client) for a checkpoint; a disk store's files
        are not copied here (the checkpoint links them, see ``lptfl.sim.checkpoint``)."""
        return (list(self._names) if self._names is not None else None), dict(self._memory)

    def restore(self, names: list[str] | None, memory: dict[int, tuple[np.ndarray, np.ndarray]]) -> None:
        """Replace the store's contents with what :meth:`snapshot` returned."""
        self._names = list(names) if names is not None else None
        self._memory = {int(c): (np.asarray(f, np.float32), np.asarray(s, np.float64)) for c, (f, s) in memory.items()}

    def arrays(self, client: int) -> tuple[np.ndarray, np.ndarray] | None:
        """Client ``client``'s state as ``(flat float32 tensors, step counts)``, or None if it has none."""
        if client not in self or self._names is None:
            return None
        if self.directory is None:
            return self._memory[client]
        with np.load(self._path(client), allow_pickle=False) as data:
            return data["flat"], data["steps"]

    def save_arrays(self, client: int, names: list[str], flat: np.ndarray, steps: np.ndarray) -> None:
        """Keep ``(flat, steps)`` (the layout :meth:`save` writes, state ``names`` sorted) as
        client ``client``'s state; a trainer that holds no optimizer object (a batched cohort) saves so."""
        if self._names is not None and self._names != names:
            raise ValueError(f"optimizer state names {names} differ from the store's {self._names}")
        self._names = list(names)
        self._put(client, (np.asarray(flat, np.float32), np.asarray(steps, np.float64)))

    def load(self, client: int, optimizer: torch.optim.Optimizer) -> None:
        """Put client ``client``'s state into ``optimizer`` (a fresh state if it has none)."""
        stored = self.arrays(client)
        if stored is None:
            optimizer.state.clear()
            return
        _unflatten(optimizer, self._names, *stored)
