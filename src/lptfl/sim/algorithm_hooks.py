"""What ``--aggregation_mode`` and ``--server_optimizer`` change in a simulated round.

The server side is :class:`lptfl.fl.server_algorithm.ServerAlgorithm` (shared with the Flower
ServerApp); the client side here: FedProx's regularizer, FedGen's objective (with the
generator the downlink carried), FedBN's per-client batch norm and its majority vote, and the
label counts each client reports with its update (FedGen, FedFTG).
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

from lptfl import codec
from lptfl.fl.algorithms import (
    LocalStateBank,
    Regularizer,
    accuracy_scorer,
    batchnorm_names,
    proximal_regularizer,
    vote_accuracy,
)
from lptfl.fl.ensemble import label_counts
from lptfl.fl.fedgen import FeatureGenerator, FedGenObjective
from lptfl.fl.server_algorithm import ServerAlgorithm

State = dict[str, torch.Tensor]


class AlgorithmHooks:
    """Built by :class:`lptfl.sim.engine.Simulation` after its server, trainer and eval model and
    called by ``run_round``.

    Args:
        sim: the simulation (``config``, ``server``, ``trainer``, ``eval_model``, ``eval_forward``,
            ``data``, ``full_precision``, ``policy``, ``client_y``, ``device``, ``seed_for``,
            ``make_fp32_model`` and, for ABAvg, ``val_x`` / ``val_y``).
    """

    def __init__(self, sim) -> None:
        cfg = sim.config
        self.sim = sim
        self.mode = cfg.aggregation_mode
        scorer = None
        if self.mode == "abavg":
            scorer = accuracy_scorer(sim.eval_model, sim.val_x, sim.val_y, batch_size=cfg.test_batch_size,
                                     forward=sim.eval_forward)
        self.server_side = ServerAlgorithm(
            cfg, sim.server, sim.trainer.model, num_classes=sim.data.num_classes, input_shape=sim.data.input_shape,
            make_fp32_model=sim.make_fp32_model, seed_for=sim.seed_for, scorer=scorer)
        server = sim.server
        self.bank: LocalStateBank | None = None
        if self.mode == "fedbn":
            self.bank = LocalStateBank(batchnorm_names(sim.trainer.model), server.global_state)
        self.uplink_full_precision = [k for k in sim.full_precision if k not in server.local_names]
        self._participants: list[int] = []
        self.objective: FedGenObjective | None = None
        self.extra_bytes_down = 0  # per client: FedGen's generator
        if self.mode == "fedgen":
            settings = cfg.fedgen_config()
            head = sim.trainer.model.classifier
            client_copy = FeatureGenerator(sim.data.num_classes, head.in_features,
                                           noise_dim=settings.noise_dim, hidden=settings.hidden)
            self.objective = FedGenObjective(client_copy.to(sim.device), settings.batch_size)

    def begin_round(self, start_state: Mapping[str, torch.Tensor]) -> Regularizer | None:
        """Called once per round with the decoded downlink; returns the local-loss regularizer."""
        self._participants = []
        self.server_side.begin_round()
        payload = self.server_side.generator_payload(self.sim.policy.downlink)
        if payload is not None:  # FedGen: the clients use the generator they decoded
            self.extra_bytes_down = len(payload)
            self.objective.generator.load_state_dict(codec.decode(payload))
            self.objective.generator.eval()
            alpha, beta, labels = self.server_side.fedgen_round(self.sim.server.round + 1)
            self.objective.set_round(alpha, beta, torch.tensor(labels))
        if self.mode == "fedprox":
            return proximal_regularizer(self.sim.trainer.model, start_state, self.sim.config.lambda_fedprox)
        return None

    def client_start(self, client: int, start_state: Mapping[str, torch.Tensor]) -> Mapping[str, torch.Tensor]:
        """The state client ``client`` starts from (FedBN: with its own batch norm)."""
        return start_state if self.bank is None else self.bank.start(client, start_state)

    def client_uplink(self, client: int, state: Mapping[str, torch.Tensor]) -> Mapping[str, torch.Tensor]:
        """What client ``client`` sends up of its trained ``state`` (FedBN: keeps batch norm); its
        label counts go along where the server needs them."""
        self._participants.append(client)
        if self.server_side.needs_label_counts:
            self.server_side.report_counts(client, label_counts(self.sim.client_y[client], self.sim.data.num_classes))
        return state if self.bank is None else self.bank.keep(client, state)

    def end_round(self) -> None:
        """Called after the server aggregated."""
        self.server_side.end_round()

    def vote_accuracy(self) -> float | None:
        """FedBN: test accuracy of the majority vote of this round's participants' models
        (served model + each client's batch norm); None for the other modes."""
        if self.bank is None or not self._participants:
            return None
        sim = self.sim
        served = sim.server.served_state()
        states = [{**served, **self.bank.local(c)} for c in self._participants]
        return vote_accuracy(sim.eval_model, states, sim.data.test_x, sim.data.test_y, sim.data.num_classes,
                             batch_size=sim.config.test_batch_size, forward=sim.eval_forward)

    def state_dict(self) -> dict[str, torch.Tensor]:
        """Algorithm state a checkpoint must keep, as flat tensors: FedBN's per-client local
        entries (``bn.<client>.<name>``) and the server side's."""
        out = self.server_side.state_dict()
        if self.bank is not None:
            for client, state in self.bank.state_dict().items():
                for name, value in state.items():
                    out[f"bn.{client}.{name}"] = value
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
        self.server_side.load_state_dict(tensors)

    @property
    def fedgen(self):
        return self.server_side.fedgen

    @property
    def fedftg(self):
        return self.server_side.fedftg
