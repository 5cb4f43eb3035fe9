"""LPT-FL on a Flower federation (Flower >= 1.42, ``pip install lptfl[flower]``).

For any Flower app (``docs/flower.md``):

- :class:`LowPrecisionFedAvg` (:mod:`lptfl.flower.fedavg`) — a ``flwr.serverapp.strategy``
  FedAvg with packed low-bit payloads, float64 aggregation and the server moving average.
- :func:`train_low_precision`, :func:`evaluate_low_precision` (:mod:`lptfl.flower.training`)
  — the ClientApp side: low-precision local training of the user's own model and data.

lptfl's own app, built on those two:

- :mod:`lptfl.flower.server_app` — the ``ServerApp`` (``lptfl.flower.server_app:app``), whose
  strategy is :mod:`lptfl.flower.run_strategy` (``LowPrecisionFedAvg`` set up from a run config)
  over the partitions of :mod:`lptfl.flower.partitions`.
- :mod:`lptfl.flower.client_app` — the ``ClientApp`` (``lptfl.flower.client_app:app``), one
  ``train_low_precision`` call per message.
- :mod:`lptfl.flower.config` — Flower run config <-> :class:`lptfl.experiment.config.RunConfig`.
- :mod:`lptfl.flower.local` — a local federation (SuperLink + SuperNodes) for ``lptfl flower-local``.

Importing this package does not import Flower (the names above are loaded on first use); its
submodules (except ``config`` and ``local``) do.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "LowPrecisionFedAvg": "lptfl.flower.fedavg",
    "train_low_precision": "lptfl.flower.training",
    "evaluate_low_precision": "lptfl.flower.training",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'lptfl.flower' has no attribute {name!r}")
    return getattr(importlib.import_module(_EXPORTS[name]), name)
