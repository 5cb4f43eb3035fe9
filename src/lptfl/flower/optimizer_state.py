"""A client's optimizer state in its node's ``Context.state``, kept between rounds.

Each Flower message runs in a fresh ClientApp process, so the paper's persistent local
optimizer state (Adam's moments and step counts) must live in the node's ``Context.state``:
one ``ArrayRecord`` holding :func:`lptfl.fl.client_state.optimizer_arrays` (one array per state
entry, as the simulator's client-state store and checkpoint keep it).
"""

from __future__ import annotations

import logging

import torch
from flwr.app import Array, ArrayRecord, RecordDict

from lptfl.fl.client_state import load_optimizer_arrays, optimizer_arrays

log = logging.getLogger(__name__)

OPTIMIZER_STATE = "lptfl-optimizer-state"


def save_optimizer_state(optimizer: torch.optim.Optimizer, state: RecordDict) -> None:
    """Keep the optimizer's state in ``state`` (nothing while it has none)."""
    arrays = optimizer_arrays(optimizer)
    if arrays is not None:
        state[OPTIMIZER_STATE] = ArrayRecord({name: Array(array) for name, array in arrays.items()})


def load_optimizer_state(optimizer: torch.optim.Optimizer, state: RecordDict) -> bool:
    """Restore what :func:`save_optimizer_state` kept; a fresh state if none (or it does not fit).

    Returns:
        True if a stored state was restored.
    """
    optimizer.state.clear()
    record = state.array_records.get(OPTIMIZER_STATE) if OPTIMIZER_STATE in state else None
    if record is None:
        return False
    try:
        load_optimizer_arrays(optimizer, {name: record[name].numpy() for name in record.keys()})
    except ValueError as err:
        log.warning("the stored optimizer state does not fit the model (%s); starting fresh", err)
        return False
    return True
