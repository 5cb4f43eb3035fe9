"""Model entries that never leave a node (e.g. FedBN's batch norm), kept in its ``Context.state``.

Each Flower message runs in a fresh ClientApp process, so entries a client keeps for itself
between rounds live in the node's ``Context.state`` as one ``ArrayRecord`` named by their state
dict keys.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from flwr.app import Array, ArrayRecord, RecordDict

LOCAL_STATE = "lptfl-local-state"


def save_local_state(state: RecordDict, values: Mapping[str, torch.Tensor]) -> None:
    """Keep ``values`` (state dict entries) in ``state`` as numpy arrays."""
    state[LOCAL_STATE] = ArrayRecord({k: Array(v.detach().cpu().numpy().copy()) for k, v in values.items()})


def load_local_state(state: RecordDict, initial: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The entries :func:`save_local_state` kept, else (none yet, or other names or shapes) ``initial``."""
    record = state.array_records.get(LOCAL_STATE) if LOCAL_STATE in state else None
    if record is None or set(record.keys()) != set(initial):
        return {k: v.clone() for k, v in initial.items()}
    kept = {k: torch.from_numpy(record[k].numpy().copy()).to(initial[k].dtype) for k in initial}
    if any(kept[k].shape != initial[k].shape for k in initial):
        return {k: v.clone() for k, v in initial.items()}
    return kept
