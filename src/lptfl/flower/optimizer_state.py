"""A client's optimizer state in its node's ``Context.state``, kept between rounds.

Each Flower message runs in a fresh ClientApp process, so the paper's persistent local
optimizer state (Adam's moments and step counts) must live in the node's ``Context.state``:
one ``ArrayRecord`` whose keys are ``"<parameter index>/<state name>"`` (e.g. ``"3/exp_avg"``)
and whose arrays have the parameter's shape (scalars for step counts).
"""

from __future__ import annotations

import logging

import torch
from flwr.app import Array, ArrayRecord, RecordDict

log = logging.getLogger(__name__)

OPTIMIZER_STATE = "lptfl-optimizer-state"


def save_optimizer_state(optimizer: torch.optim.Optimizer, state: RecordDict) -> None:
    """Put the optimizer's per-parameter tensors into ``state`` as numpy arrays."""
    params = [p for group in optimizer.param_groups for p in group["params"]]
    arrays = {}
    for i, p in enumerate(params):
        for name, value in optimizer.state.get(p, {}).items():
            if torch.is_tensor(value):
                arrays[f"{i}/{name}"] = Array(value.detach().cpu().numpy().copy())
    if arrays:
        state[OPTIMIZER_STATE] = ArrayRecord(arrays)


def load_optimizer_state(optimizer: torch.optim.Optimizer, state: RecordDict) -> bool:
    """Restore what :func:`save_optimizer_state` kept; a fresh state if none (or it does not fit).

    Returns:
        True if a stored state was restored.
    """
    optimizer.state.clear()
    record = state.array_records.get(OPTIMIZER_STATE) if OPTIMIZER_STATE in state else None
    if record is None:
        return False
    params = [p for group in optimizer.param_groups for p in group["params"]]
    restored: dict = {}
    for key in record.keys():
        index, name = key.split("/", 1)
        if not index.isdigit() or int(index) >= len(params):
            log.warning("stored optimizer state names parameter %s of %d; starting fresh", index, len(params))
            return False
        p = params[int(index)]
        value = torch.from_numpy(record[key].numpy().copy())
        if value.dim() > 0 and value.shape != p.shape:
            log.warning("stored optimizer state does not fit the model; starting fresh")
            return False
        restored.setdefault(p, {})[name] = value.to(p.device)
    for p, values in restored.items():
        optimizer.state[p] = values
    return True
