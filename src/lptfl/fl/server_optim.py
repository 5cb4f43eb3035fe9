"""Server optimizers on the aggregated update (FedOpt family: FedAvgM, FedAdam, FedYogi).

The pseudo-gradient of a round is ``g = served - mean``: the model the clients started from
minus the aggregate of their models. The optimizer turns it into the new global model ``w``
(the server's moving average, when enabled, then mixes ``w`` in as usual). Only trainable
parameters are optimized; buffers (batch-norm statistics, counters) take the plain aggregate.
State (momentum / moments) is kept in float64.

Update rules follow Flower's ``FedAvgM``, ``FedAdam`` and ``FedYogi`` (Reddi et al. 2021):

- ``fedavgm``: ``m = momentum * m + g`` (``m = g`` in the first step), ``w = served - lr * m``;
  with momentum 0 and lr 1 this is exactly the plain mean.
- ``fedadam``: ``d = -g``; ``m = b1 m + (1-b1) d``; ``v = b2 v + (1-b2) d^2``;
  ``w = served + lr * sqrt(1-b2^t)/(1-b1^t) * m / (sqrt(v) + tau)``.
- ``fedyogi``: as fedadam but ``v = v - (1-b2) d^2 sign(v - d^2)`` and no bias correction.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping

import torch

State = dict[str, torch.Tensor]

SERVER_OPTIMIZERS = ("none", "fedavgm", "fedadam", "fedyogi")
# Flower's defaults for the server learning rate and tau (used when the flags are 0)
DEFAULT_LR = {"fedavgm": 1.0, "fedadam": 0.1, "fedyogi": 0.01}
DEFAULT_TAU = {"fedadam": 1e-9, "fedyogi": 1e-3}


class ServerOptimizer:
    """Turns ``(served, mean)`` into the new global model, keeping optimizer state across rounds.

    Args:
        kind: ``"fedavgm"``, ``"fedadam"`` or ``"fedyogi"``.
        names: the state entries to optimize (trainable parameters); others take the mean.
        lr: server learning rate (0: the optimizer's default, see :data:`DEFAULT_LR`).
        momentum: FedAvgM momentum.
        beta1, beta2: FedAdam/FedYogi moment decay rates.
        tau: FedAdam/FedYogi adaptivity (0: the optimizer's default, see :data:`DEFAULT_TAU`).
    """

    def __init__(
        self,
        kind: str,
        names: Iterable[str],
        *,
        lr: float = 0.0,
        momentum: float = 0.9,
        beta1: float = 0.9,
        beta2: float = 0.99,
        tau: float = 0.0,
    ) -> None:
        if kind not in SERVER_OPTIMIZERS or kind == "none":
            raise ValueError(f"server optimizer must be one of {SERVER_OPTIMIZERS[1:]}, got {kind!r}")
        self.kind = kind
        self.names = list(names)
        self.lr = lr if lr > 0 else DEFAULT_LR[kind]
        self.momentum = momentum
        self.beta1, self.beta2 = beta1, beta2
        self.tau = tau if tau > 0 else DEFAULT_TAU.get(kind, 1e-3)
        self.steps = 0
        self.m: State = {}
        self.v: State = {}

    def step(self, served: Mapping[str, torch.Tensor], mean: Mapping[str, torch.Tensor]) -> State:
        """The new global model from the model served this round and the clients' aggregate."""
        self.steps += 1
        out: State = dict(mean)
        for name in self.names:
            if name not in mean or not mean[name].is_floating_point():
                continue
            x = served[name].to(torch.float64)
            delta = mean[name].to(torch.float64) - x  # = -pseudo-gradient
            if self.kind == "fedavgm":
                g = -delta
                if self.momentum > 0:
                    g = g if name not in self.m else self.momentum * self.m[name] + g
                    self.m[name] = g
                new = x - self.lr * g
            else:
                m = self.m.get(name, torch.zeros_like(x))
                v = self.v.get(name, torch.zeros_like(x))
                m = self.beta1 * m + (1 - self.beta1) * delta
                d2 = delta * delta
                if self.kind == "fedadam":
                    v = self.beta2 * v + (1 - self.beta2) * d2
                    lr = self.lr * math.sqrt(1 - self.beta2**self.steps) / (1 - self.beta1**self.steps)
                else:
                    v = v - (1 - self.beta2) * d2 * torch.sign(v - d2)
                    lr = self.lr
                self.m[name], self.v[name] = m, v
                new = x + lr * m / (v.sqrt() + self.tau)
            out[name] = new.to(mean[name].dtype)
        return out

    def state_dict(self) -> State:
        """The step count (``steps``, int64) and the moments (``m.<name>``, ``v.<name>``, float64)."""
        out = {"steps": torch.tensor(self.steps, dtype=torch.int64)}
        for part, moments in (("m", self.m), ("v", self.v)):
            out.update({f"{part}.{k}": v.clone() for k, v in moments.items()})
        return out

    def load_state_dict(self, state: Mapping[str, torch.Tensor]) -> None:
        """Restore what :meth:`state_dict` returned."""
        self.steps = int(state["steps"])
        self.m, self.v = ({k[2:]: v.to(torch.float64).clone() for k, v in state.items() if k.startswith(f"{part}.")}
                          for part in ("m", "v"))
