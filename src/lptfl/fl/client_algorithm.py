"""The client side of ``--aggregation_mode``, shared by the in-process simulator and the Flower
ClientApp (the server side is :mod:`lptfl.fl.server_algorithm`).

FedProx adds its proximal term to the local loss, FedGen its objective with the generator the
downlink carried, FedBN keeps each client's batch norm out of the downlink and the uplink, and
FedGen's and FedFTG's clients report their label counts with their updates.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

import torch
from torch import nn

from lptfl import codec
from lptfl.fl.algorithms import LocalStateBank, Regularizer, batchnorm_names, proximal_regularizer
from lptfl.fl.ensemble import label_counts
from lptfl.fl.fedgen import FeatureGenerator, FedGenObjective

State = dict[str, torch.Tensor]


class ClientAlgorithm:
    """Client-side state and hooks of the run's FL algorithm, for every client of a run (the
    simulator's) or for one (a Flower node's).

    Args:
        config: the run's settings (a :class:`lptfl.experiment.config.RunConfig`).
        model: a fresh model of the run (its batch-norm entries and their initial values, its
            classifier's width).
        num_classes: classes of the task.
        device: where FedGen's generator runs.
    """

    def __init__(self, config, model: nn.Module, *, num_classes: int, device: torch.device | str = "cpu") -> None:
        mode = config.aggregation_mode
        self.num_classes = num_classes
        self.proximal_mu = config.lambda_fedprox if mode == "fedprox" else 0.0
        self.reports_label_counts = mode in ("fedgen", "fedftg")
        self.local_names = batchnorm_names(model) if mode == "fedbn" else []
        self.bank = LocalStateBank(self.local_names, model.state_dict()) if mode == "fedbn" else None
        self.objective: FedGenObjective | None = None
        if mode == "fedgen":
            settings = config.fedgen_config()
            generator = FeatureGenerator(num_classes, model.classifier.in_features, noise_dim=settings.noise_dim,
                                         hidden=settings.hidden)
            self.objective = FedGenObjective(generator.to(device), settings.batch_size)

    def begin_round(self, generator: bytes, alpha: float, beta: float, labels: Iterable[int]) -> None:
        """FedGen: the round's generator (the payload that came with the downlink), its
        coefficients and the labels it knows."""
        self.objective.generator.load_state_dict(codec.decode(generator))
        self.objective.set_round(alpha, beta, torch.tensor(list(labels), dtype=torch.int64))

    def regularizer(self, model: nn.Module, anchor: Mapping[str, torch.Tensor]) -> Regularizer | None:
        """FedProx's ``lambda ||w - anchor||^2`` on ``model``'s parameters; None for the other modes."""
        return proximal_regularizer(model, anchor, self.proximal_mu)

    def start(self, client: int, shared: Mapping[str, torch.Tensor]) -> Mapping[str, torch.Tensor]:
        """The state ``client`` starts from: the decoded downlink (FedBN: with its own batch norm)."""
        return shared if self.bank is None else self.bank.start(client, shared)

    def uplink(self, client: int, state: Mapping[str, torch.Tensor]) -> Mapping[str, torch.Tensor]:
        """What ``client`` sends of its trained ``state`` (FedBN: keeps its batch norm)."""
        return state if self.bank is None else self.bank.keep(client, state)

    def client_state(self, client: int) -> State | None:
        """What ``client`` keeps between rounds (FedBN: its batch norm), or None (nothing kept yet)."""
        return None if self.bank is None else self.bank.own(client)

    def load_client_state(self, client: int, state: Mapping[str, torch.Tensor] | None) -> None:
        """Make ``state`` (what :meth:`client_state` returned, perhaps in another process) ``client``'s."""
        if self.bank is not None:
            self.bank.put(client, state)

    def label_counts(self, y: torch.Tensor) -> torch.Tensor | None:
        """Samples per class of labels ``y`` where the server needs them (FedGen, FedFTG), else None."""
        return label_counts(y, self.num_classes) if self.reports_label_counts else None

    def local_states(self, served: Mapping[str, torch.Tensor], clients: Iterable[int]) -> list[State]:
        """FedBN: ``served`` with each of ``clients``' own batch norm (the models of the majority
        vote); empty for the other modes."""
        return [] if self.bank is None else [{**served, **self.bank.local(c)} for c in clients]

    def state_dict(self) -> dict[str, torch.Tensor]:
        """FedBN's per-client entries as flat tensors (``bn.<client>.<name>``)."""
        states = {} if self.bank is None else self.bank.state_dict()
        return {f"bn.{client}.{name}": value for client, state in states.items() for name, value in state.items()}

    def load_state_dict(self, tensors: Mapping[str, torch.Tensor]) -> None:
        """Restore what :meth:`state_dict` returned (other keys are ignored)."""
        if self.bank is None:
            return
        states: dict[int, State] = {}
        for key, value in tensors.items():
            if key.startswith("bn."):
                client, name = key[3:].split(".", 1)
                states.setdefault(int(client), {})[name] = value
        self.bank.load_state_dict(states)
