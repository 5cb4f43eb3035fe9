"""High-precision aggregation and the server's moving average (REFERENCE §1.3)."""

from __future__ import annotations

from collections.abc import Mapping

import torch

State = dict[str, torch.Tensor]


class RunningMean:
    """Weighted mean of client states, accumulated in float64 as clients arrive.

    Never holds more than one sum per tensor, whatever the number of clients. Integer
    buffers (e.g. ``num_batches_tracked``) are taken from the first client.
    """

    def __init__(self) -> None:
        self._sum: State = {}
        self._ints: State = {}
        self.total_weight = 0.0
        self.count = 0

    def add(self, state: Mapping[str, torch.Tensor], weight: float = 1.0) -> None:
        """Add one client's state with aggregation weight ``weight`` (> 0)."""
        if not weight > 0:
            raise ValueError(f"aggregation weight must be > 0, got {weight}")
        for name, tensor in state.items():
            if tensor.is_floating_point():
                contribution = tensor.detach().to(torch.float64) * weight
                if name in self._sum:
                    self._sum[name] += contribution
                else:
                    self._sum[name] = contribution.clone()
            elif name not in self._ints:
                self._ints[name] = tensor.detach().clone()
        self.total_weight += weight
        self.count += 1

    def result(self, like: Mapping[str, torch.Tensor]) -> State:
        """The mean, in the dtypes of ``like`` (the global state)."""
        if self.count == 0:
            raise RuntimeError("no client state was aggregated")
        out: State = {}
        for name, ref in like.items():
            if name in self._sum:
                out[name] = (self._sum[name] / self.total_weight).to(ref.dtype)
            elif name in self._ints:
                out[name] = self._ints[name].to(ref.dtype)
            else:
                out[name] = ref.detach().clone()
        return out


def moving_average(average: Mapping[str, torch.Tensor], new: Mapping[str, torch.Tensor], weight: float) -> State:
    """``weight * average + (1 - weight) * new`` for float tensors (float64 arithmetic);
    integer buffers come from ``new``."""
    out: State = {}
    for name, value in new.items():
        if value.is_floating_point():
            mixed = weight * average[name].to(torch.float64) + (1.0 - weight) * value.to(torch.float64)
            out[name] = mixed.to(value.dtype)
        else:
            out[name] = value.clone()
    return out
