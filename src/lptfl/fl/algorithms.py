"""FL algorithms compatible with the low-precision paradigm (REFERENCE §6): the pieces of FedProx,
FedBN and ABAvg; FedGen and FedFTG live in :mod:`lptfl.fl.fedgen` and :mod:`lptfl.fl.fedftg`, the
server-side wiring in :mod:`lptfl.fl.server_algorithm`.

Each algorithm changes one side of a FedAvg round; the low-precision local training, the
quantized wire format, the high-precision aggregation and the moving average stay as they are.

- ``fedprox``: local loss + ``mu * ||w - w_global||^2`` (:func:`proximal_regularizer`), with
  ``w_global`` the decoded downlink model (one snapshot per round, no per-step copies).
- ``fedbn``: batch-norm parameters and running statistics stay on each client: they are
  neither sent up nor aggregated nor overwritten by the downlink (:class:`LocalStateBank`).
  Besides the global model, the majority vote of the participating clients' models (each with
  its own batch norm, as the published code reports) is evaluated (:func:`vote_accuracy`).
- ``abavg``: the server weights each client model by its accuracy on server-held validation
  data (:func:`validation_split` holds it out of the clients' partition pool by default).
- ``fedgen``: a server-trained feature generator travels with the downlink and regularises
  local training. Each update's label counts (``classes`` integers) go to the server with it;
  they are not counted in ``bytes_up``.
- ``fedftg`` (``fedtgp``): the server fine-tunes each aggregate by data-free distillation
  from the round's client models (label counts as for FedGen).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping

import numpy as np
import torch
from torch import nn

from lptfl.fl.client import batched_logits, evaluate
from lptfl.fl.seeds import VALIDATION_TAG

State = dict[str, torch.Tensor]
Regularizer = Callable[[nn.Module], torch.Tensor]

AGGREGATION_MODES = ("fedavg", "fedprox", "fedbn", "abavg", "fedgen", "fedftg")
MODE_ALIASES = {"fedtgp": "fedftg"}  # the published code's name
MIN_ABAVG_WEIGHT = 1e-6  # a client whose model scores 0 still gets a (negligible) positive weight


# ---------------------------------------------------------------- FedProx


def proximal_regularizer(model: nn.Module, anchor: Mapping[str, torch.Tensor], mu: float) -> Regularizer | None:
    """``mu * sum_p ||p - anchor[p]||^2`` over ``model``'s trainable parameters, or None if ``mu == 0``.

    ``anchor`` (the downlink / global weights) is snapshotted once here, on the model's
    device; the returned closure allocates no copies of the weights per step.
    """
    if mu == 0:
        return None
    if mu < 0:
        raise ValueError(f"the FedProx mu must be >= 0, got {mu}")
    params = [(name, p) for name, p in model.named_parameters() if p.requires_grad]
    missing = [name for name, _ in params if name not in anchor]
    if missing:
        raise KeyError(f"the global state lacks parameters {missing[:4]}")
    return ProximalTerm([p for _, p in params], [anchor[name] for name, _ in params], mu)


class ProximalTerm:
    """FedProx's ``mu * sum ||p - a||^2`` for fixed parameter tensors ``params``.

    Calling it gives the term (differentiable; :class:`LocalTrainer` adds it to the loss).
    :meth:`add_gradient` instead adds its exact gradient ``2 mu (p - a)`` to ``p.grad`` after
    the loss's backward, which lets the trainer keep its fused (compiled) step; the trainer
    uses that when present. The anchors are copied once, on the parameters' device.
    """

    def __init__(self, params: list[torch.Tensor], anchors: list[torch.Tensor], mu: float) -> None:
        self.params = params
        self.anchors = [a.detach().to(device=p.device, dtype=p.dtype).clone() for p, a in zip(params, anchors)]
        self.mu = mu

    def __call__(self, _model: nn.Module | None = None) -> torch.Tensor:
        total = self.params[0].new_zeros(())
        for p, a in zip(self.params, self.anchors):
            total = total + (p - a).pow(2).sum()
        return self.mu * total

    @torch.no_grad()
    def add_gradient(self) -> None:
        for p, a in zip(self.params, self.anchors):
            if p.grad is None:
                p.grad = torch.zeros_like(p)
            p.grad.add_(p - a, alpha=2.0 * self.mu)


# ---------------------------------------------------------------- FedBN


def batchnorm_names(model: nn.Module) -> list[str]:
    """State-dict names of every batch-norm layer's parameters and buffers, in state order."""
    prefixes = [name for name, module in model.named_modules() if isinstance(module, nn.modules.batchnorm._BatchNorm)]
    names = []
    for key in model.state_dict():
        module, _, _ = key.rpartition(".")
        if module in prefixes:
            names.append(key)
    return names


class LocalStateBank:
    """Per-client state entries that never leave the client (FedBN's batch norm).

    A client that has not trained yet starts from ``initial`` (the model's initial values).
    Memory: one copy of the local entries per client that took part (a few KB for BN).

    Args:
        names: the local entries.
        initial: a state holding at least ``names``.
    """

    def __init__(self, names: Iterable[str], initial: Mapping[str, torch.Tensor]) -> None:
        self.names = list(names)
        self.initial: State = {k: initial[k].detach().cpu().clone() for k in self.names}
        self.states: dict[int, State] = {}

    def __contains__(self, client: int) -> bool:
        return client in self.states

    def local(self, client: int) -> State:
        """The client's local entries (its own, or the initial ones)."""
        return self.states.get(client, self.initial)

    def start(self, client: int, shared: Mapping[str, torch.Tensor]) -> State:
        """The client's start state: the downlink's shared entries plus its own local ones."""
        out = {k: v for k, v in shared.items() if k not in self.initial}
        out.update(self.local(client))
        return out

    def own(self, client: int) -> State | None:
        """The client's own entries, or None while it has not trained."""
        return self.states.get(client)

    def put(self, client: int, state: Mapping[str, torch.Tensor] | None) -> None:
        """Make ``state`` the client's own entries (None: it has none, it starts from the initial ones)."""
        if state is None:
            self.states.pop(client, None)
        else:
            self.states[client] = {k: state[k].detach().cpu().clone() for k in self.names}

    def keep(self, client: int, state: Mapping[str, torch.Tensor]) -> State:
        """Store the client's local entries of ``state``; return the rest (what is sent up)."""
        self.put(client, state)
        return {k: v for k, v in state.items() if k not in self.initial}

    def state_dict(self) -> dict[int, State]:
        return {c: {k: v.clone() for k, v in s.items()} for c, s in self.states.items()}

    def load_state_dict(self, states: Mapping[int, Mapping[str, torch.Tensor]]) -> None:
        self.states = {int(c): {k: v.detach().cpu().clone() for k, v in s.items()} for c, s in states.items()}


@torch.no_grad()
def vote_accuracy(
    model: nn.Module,
    states: list[Mapping[str, torch.Tensor]],
    x: torch.Tensor,
    y: torch.Tensor,
    num_classes: int,
    *,
    batch_size: int = 1000,
    forward: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> float:
    """Accuracy (fraction) of the majority vote of ``model`` loaded with each of ``states``
    (ties go to the lowest class index). Loads the states into ``model`` in turn; ``forward``
    (e.g. the compiled ``model``) replaces ``model(x)``."""
    if not states:
        return 0.0
    device = next(model.parameters()).device
    forward = model if forward is None else forward
    votes = torch.zeros(int(y.shape[0]), num_classes, dtype=torch.int32, device=device)
    rows = torch.arange(int(y.shape[0]), device=device)
    for state in states:
        model.load_state_dict(state)
        model.eval()
        for i, logits in batched_logits(forward, x, batch_size, device):
            votes[rows[i : i + logits.shape[0]], logits.argmax(1)] += 1
    return float((votes.argmax(1).cpu() == y.cpu()).double().mean())


# ---------------------------------------------------------------- ABAvg


def validation_split(n: int, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(training pool, held-out validation indices) of ``n`` training samples: a seeded random
    ``fraction`` (at least 1 sample, at most n - 1) is held out; both are sorted."""
    if not 0 < fraction < 1:
        raise ValueError(f"the validation fraction must be in (0, 1), got {fraction}")
    k = min(max(1, int(round(fraction * n))), n - 1)
    rng = np.random.default_rng(np.random.SeedSequence([int(seed), VALIDATION_TAG]))
    val = np.sort(rng.choice(n, size=k, replace=False))
    pool = np.setdiff1d(np.arange(n), val)
    return pool, val


def accuracy_scorer(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    *,
    batch_size: int = 1000,
    forward: Callable[[torch.Tensor], torch.Tensor] | None = None,
    base: Mapping[str, torch.Tensor] | None = None,
) -> Callable[[Mapping[str, torch.Tensor]], float]:
    """A server scorer for ABAvg: ``state -> aggregation weight`` = the accuracy of ``model``
    loaded with ``state`` (entries missing from it come from ``base``) on ``(x, y)``."""
    def score(state: Mapping[str, torch.Tensor]) -> float:
        full = dict(base) if base is not None else {}
        full.update(state)
        model.load_state_dict(full)
        _, accuracy = evaluate(model, x, y, batch_size=batch_size, forward=forward)
        return max(accuracy, MIN_ABAVG_WEIGHT)

    return score
