"""Robust aggregation: coordinate-wise median and trimmed mean of the round's updates.

Unlike :class:`lptfl.fl.aggregate.RunningMean` these hold every accepted update of the
round (one float64 copy each), which is the price of an order statistic. Client weights
are ignored (every accepted update counts once). Integer buffers (e.g.
``num_batches_tracked``) are taken from the first client, as in the running mean.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import torch

from lptfl.fl.aggregate import State

ROBUST_MODES = ("none", "median", "trimmed_mean")


class CoordinateWise:
    """Collects states; :meth:`result` is their coordinate-wise median or trimmed mean.

    Args:
        mode: ``"median"`` or ``"trimmed_mean"``.
        trim_fraction: for ``trimmed_mean``, the fraction in [0, 0.5) of updates dropped at
            each end of every coordinate (``floor(trim_fraction * n)`` of ``n``).
    """

    def __init__(self, mode: str, trim_fraction: float = 0.1) -> None:
        if mode not in ("median", "trimmed_mean"):
            raise ValueError(f"robust mode must be 'median' or 'trimmed_mean', got {mode!r}")
        if not 0.0 <= trim_fraction < 0.5:
            raise ValueError(f"trim_fraction must be in [0, 0.5), got {trim_fraction}")
        self.mode = mode
        self.trim_fraction = trim_fraction
        self._states: list[State] = []
        self._ints: State = {}

    @property
    def count(self) -> int:
        return len(self._states)

    def add(self, state: Mapping[str, torch.Tensor], weight: float = 1.0) -> None:
        """Keep one client's state (``weight`` is ignored)."""
        floats: State = {}
        for name, tensor in state.items():
            if tensor.is_floating_point():
                floats[name] = tensor.detach().to(torch.float64)
            elif name not in self._ints:
                self._ints[name] = tensor.detach().clone()
        self._states.append(floats)

    def result(self, like: Mapping[str, torch.Tensor]) -> State:
        """The aggregate, in the dtypes of ``like`` (the global state)."""
        if not self._states:
            raise RuntimeError("no client state was aggregated")
        n = len(self._states)
        out: State = {}
        for name, ref in like.items():
            if name in self._states[0]:
                stacked = torch.stack([s[name] for s in self._states])
                out[name] = _reduce(stacked, self.mode, self.trim_fraction, n).to(ref.dtype)
            elif name in self._ints:
                out[name] = self._ints[name].to(ref.dtype)
            else:
                out[name] = ref.detach().clone()
        return out


def _reduce(stacked: torch.Tensor, mode: str, trim_fraction: float, n: int) -> torch.Tensor:
    if mode == "median":
        # the mean of the two middle values for an even count (torch.median takes the lower one)
        ordered, _ = torch.sort(stacked, dim=0)
        lo, hi = (n - 1) // 2, n // 2
        return (ordered[lo] + ordered[hi]) / 2
    k = math.floor(trim_fraction * n)
    ordered, _ = torch.sort(stacked, dim=0)
    return ordered[k : n - k].mean(dim=0)


def update_distance(update: Mapping[str, torch.Tensor], reference: Mapping[str, torch.Tensor]) -> float:
    """L2 norm of ``update - reference`` over all floating tensors (float64 arithmetic)."""
    total = 0.0
    for name, value in update.items():
        if value.is_floating_point() and name in reference:
            diff = value.detach().to(torch.float64) - reference[name].detach().to(torch.float64)
            total += float(torch.sum(diff * diff))
    return math.sqrt(total)
