"""FL algorithms compatible with the low-precision paradigm (REFERENCE §6): FedProx, FedBN, ABAvg,
and the simulator's hooks that also drive FedGen (:mod:`lptfl.fl.fedgen`) and FedFTG
(:mod:`lptfl.fl.fedftg`).

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

import logging
from collections.abc import Callable, Iterable, Mapping

import numpy as np
import torch
from torch import nn

from lptfl import codec
from lptfl.fl.client import evaluate
from lptfl.fl.ensemble import label_counts
from lptfl.fl.fedftg import FedFTGServer
from lptfl.fl.fedgen import FeatureGenerator, FedGenObjective, FedGenServer
from lptfl.fl.server import full_precision_names
from lptfl.fl.server_optim import ServerOptimizer

log = logging.getLogger(__name__)

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

    def keep(self, client: int, state: Mapping[str, torch.Tensor]) -> State:
        """Store the client's local entries of ``state``; return the rest (what is sent up)."""
        self.states[client] = {k: state[k].detach().cpu().clone() for k in self.names}
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
) -> float:
    """Accuracy (fraction) of the majority vote of ``model`` loaded with each of ``states``
    (ties go to the lowest class index). Loads the states into ``model`` in turn."""
    if not states:
        return 0.0
    device = next(model.parameters()).device
    votes = torch.zeros(int(y.shape[0]), num_classes, dtype=torch.int32, device=device)
    rows = torch.arange(int(y.shape[0]), device=device)
    for state in states:
        model.load_state_dict(state)
        model.eval()
        for i in range(0, int(y.shape[0]), batch_size):
            pred = model(x[i : i + batch_size].to(device)).argmax(1)
            votes[rows[i : i + batch_size], pred] += 1
    return float((votes.argmax(1).cpu() == y.cpu()).double().mean())


# ---------------------------------------------------------------- ABAvg


def validation_split(n: int, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(training pool, held-out validation indices) of ``n`` training samples: a seeded random
    ``fraction`` (at least 1 sample, at most n - 1) is held out; both are sorted."""
    if not 0 < fraction < 1:
        raise ValueError(f"the validation fraction must be in (0, 1), got {fraction}")
    k = min(max(1, int(round(fraction * n))), n - 1)
    rng = np.random.default_rng(np.random.SeedSequence([int(seed), 0xAB]))
    val = np.sort(rng.choice(n, size=k, replace=False))
    pool = np.setdiff1d(np.arange(n), val)
    return pool, val


def abavg_weights(accuracies: Iterable[float]) -> list[float]:
    """ABAvg's normalised aggregation weights: proportional to the accuracies (uniform if all are 0)."""
    raw = [max(float(a), MIN_ABAVG_WEIGHT) for a in accuracies]
    total = sum(raw)
    return [r / total for r in raw]


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


# ---------------------------------------------------------------- the simulator's hooks


class AlgorithmHooks:
    """What ``--aggregation_mode`` and ``--server_optimizer`` change in a simulated round.

    Built by :class:`lptfl.sim.engine.Simulation` after its server, trainer and eval model; it
    configures the server (local entries, scorer, optimizer) and is called by ``run_round``.

    Args:
        sim: the simulation (``config``, ``server``, ``trainer``, ``eval_model``, ``eval_forward``,
            ``data``, ``full_precision``, ``policy``, ``client_y``, ``device``, ``seed_for``,
            ``make_fp32_model`` and, for ABAvg, ``val_x`` / ``val_y``).
    """

    def __init__(self, sim) -> None:
        cfg = sim.config
        self.sim = sim
        self.mode = cfg.aggregation_mode
        self.bank: LocalStateBank | None = None
        server = sim.server
        if self.mode == "fedbn":
            names = batchnorm_names(sim.trainer.model)
            if not names:
                log.warning(
                    "--aggregation_mode fedbn: the model has no batch-norm layer, so it runs as FedAvg "
                    "(use --model_name resnet8 or --model_norm batchnorm)")
            self.bank = LocalStateBank(names, server.global_state)
            server.keep_local(names)
        if self.mode == "abavg":
            server.scorer = accuracy_scorer(
                sim.eval_model, sim.val_x, sim.val_y, batch_size=cfg.test_batch_size, forward=sim.eval_forward)
        if cfg.server_optimizer != "none":
            params = [n for n, _ in sim.trainer.model.named_parameters() if n not in server.local_names]
            server.optimizer = ServerOptimizer(
                cfg.server_optimizer, params, lr=cfg.server_lr, momentum=cfg.server_momentum,
                beta1=cfg.server_beta1, beta2=cfg.server_beta2, tau=cfg.server_tau)
        self.uplink_full_precision = [k for k in sim.full_precision if k not in server.local_names]
        self._participants: list[int] = []
        self.objective: FedGenObjective | None = None
        self.fedgen: FedGenServer | None = None
        self.fedftg: FedFTGServer | None = None
        self.extra_bytes_down = 0  # per client: FedGen's generator
        self._accepted: list[tuple[State, torch.Tensor]] = []  # (decoded update, label counts)
        if self.mode == "fedgen":
            head = sim.trainer.model.classifier
            settings = cfg.fedgen_config()
            self.fedgen = FedGenServer(sim.data.num_classes, head.in_features, settings, seed=sim.seed_for(0xF6))
            client_copy = FeatureGenerator(sim.data.num_classes, head.in_features,
                                           noise_dim=settings.noise_dim, hidden=settings.hidden)
            self.objective = FedGenObjective(client_copy.to(sim.device), settings.batch_size)
            server.on_accept = self._accept
        if self.mode == "fedftg":
            self.fedftg = FedFTGServer(sim.make_fp32_model, sim.data.num_classes, sim.data.input_shape,
                                       cfg.fedftg_config(), seed=sim.seed_for(0xF7))
            server.on_accept = self._accept
            server.refine = self._refine

    def _accept(self, client: int | str, state: State, _num_samples: int) -> None:
        counts = label_counts(self.sim.client_y[int(client)], self.sim.data.num_classes)
        if self.fedgen is not None:
            state = {k: v for k, v in state.items() if k.startswith("classifier.")}
        self._accepted.append((state, counts))

    def _refine(self, aggregate: State) -> State:
        states = [{**aggregate, **state} for state, _ in self._accepted]
        generator = torch.Generator().manual_seed(self.sim.seed_for(self.sim.server.round, 0xF7))
        return self.fedftg.refine(aggregate, states, [c for _, c in self._accepted], generator)

    def _send_generator(self, round_index: int) -> None:
        """FedGen's downlink extra: the generator, encoded like the model; the clients' copy is
        what they decode."""
        generator = self.fedgen.generator
        payload = codec.encode(generator.state_dict(), self.sim.policy.downlink,
                               full_precision=full_precision_names(generator))
        self.extra_bytes_down = len(payload)
        self.objective.generator.load_state_dict(codec.decode(payload))
        self.objective.generator.eval()
        alpha, beta = self.fedgen.coefficients(round_index)
        self.objective.set_round(alpha, beta, self.fedgen.labels)

    def end_round(self) -> None:
        """Called after the server aggregated: FedGen trains its generator on the round's heads."""
        if self.fedgen is not None and self._accepted:
            heads = [(s["classifier.weight"], s["classifier.bias"]) for s, _ in self._accepted]
            generator = torch.Generator().manual_seed(self.sim.seed_for(self.sim.server.round, 0xF6))
            self.fedgen.train(heads, [c for _, c in self._accepted], generator)
        self._accepted = []

    def begin_round(self, start_state: Mapping[str, torch.Tensor]) -> Regularizer | None:
        """Called once per round with the decoded downlink; returns the local-loss regularizer."""
        self._participants = []
        self._accepted = []
        if self.fedgen is not None:
            self._send_generator(self.sim.server.round + 1)
        if self.mode == "fedprox":
            return proximal_regularizer(self.sim.trainer.model, start_state, self.sim.config.lambda_fedprox)
        return None

    def client_start(self, client: int, start_state: Mapping[str, torch.Tensor]) -> Mapping[str, torch.Tensor]:
        """The state client ``client`` starts from (FedBN: with its own batch norm)."""
        return start_state if self.bank is None else self.bank.start(client, start_state)

    def client_uplink(self, client: int, state: Mapping[str, torch.Tensor]) -> Mapping[str, torch.Tensor]:
        """What client ``client`` sends up of its trained ``state`` (FedBN: keeps batch norm)."""
        self._participants.append(client)
        return state if self.bank is None else self.bank.keep(client, state)

    def vote_accuracy(self) -> float | None:
        """FedBN: test accuracy of the majority vote of this round's participants' models
        (served model + each client's batch norm); None for the other modes."""
        if self.bank is None or not self._participants:
            return None
        sim = self.sim
        served = sim.server.served_state()
        states = [{**served, **self.bank.local(c)} for c in self._participants]
        return vote_accuracy(sim.eval_model, states, sim.data.test_x, sim.data.test_y, sim.data.num_classes,
                             batch_size=sim.config.test_batch_size)

    def state_dict(self) -> dict[str, torch.Tensor]:
        """Algorithm state a checkpoint must keep, as flat tensors: FedBN's per-client local
        entries (``bn.<client>.<name>``) and the server optimizer's (``server_opt.*``)."""
        out: dict[str, torch.Tensor] = {}
        if self.bank is not None:
            for client, state in self.bank.state_dict().items():
                for name, value in state.items():
                    out[f"bn.{client}.{name}"] = value
        if self.fedgen is not None:
            out.update(self.fedgen.state_dict())
        if self.fedftg is not None:
            out.update(self.fedftg.state_dict())
        optimizer = self.sim.server.optimizer
        if optimizer is not None:
            state = optimizer.state_dict()
            out["server_opt.steps"] = torch.tensor(state["steps"], dtype=torch.int64)
            for part in ("m", "v"):
                for name, value in state[part].items():
                    out[f"server_opt.{part}.{name}"] = value
        return out

    def load_state_dict(self, tensors: Mapping[str, torch.Tensor]) -> None:
        """Restore what :meth:`state_dict` returned."""
        if self.bank is not None:
            states: dict[int, State] = {}
            for key, value in tensors.items():
                if key.startswith("bn."):
                    client, name = key[3:].split(".", 1)
                    states.setdefault(int(client), {})[name] = value
            self.bank.load_state_dict(states)
        if self.fedgen is not None:
            self.fedgen.load_state_dict(tensors)
        if self.fedftg is not None:
            self.fedftg.load_state_dict(tensors)
        optimizer = self.sim.server.optimizer
        if optimizer is not None and "server_opt.steps" in tensors:
            state: dict = {"steps": int(tensors["server_opt.steps"]), "m": {}, "v": {}}
            for key, value in tensors.items():
                for part in ("m", "v"):
                    if key.startswith(f"server_opt.{part}."):
                        state[part][key[len(f"server_opt.{part}."):]] = value
            optimizer.load_state_dict(state)
