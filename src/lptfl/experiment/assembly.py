"""The one assembly of a run that both drivers use: the simulator (:class:`lptfl.sim.engine.Simulation`)
and the Flower apps (:mod:`lptfl.flower.server_app`, :mod:`lptfl.flower.client_app`) build the same
data, partition, model, precision policy, compile decision, scorer and server from a config; they
keep only what is theirs (moving messages, handling failures).
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Mapping

import torch

from lptfl.data import load_dataset, partition_summary
from lptfl.experiment.config import RunConfig
from lptfl.experiment.evaluation import ServedModelScorer
from lptfl.experiment.setup import build_run_model, compile_plan, split_clients, validation_data
from lptfl.fl import Server, full_precision_names
from lptfl.fl.algorithms import accuracy_scorer
from lptfl.fl.client_algorithm import ClientAlgorithm
from lptfl.fl.seeds import derive_seed
from lptfl.fl.server_algorithm import ServerAlgorithm

log = logging.getLogger(__name__)


class RunAssembly:
    """A run of ``config``, put together (``config`` is validated here).

    Attributes:
        device: where models train and are scored.
        data: the dataset, as tensors.
        parts: each client's indices into the training set (``config.num_clients`` clients).
        val_x, val_y: ABAvg's server-held validation data (None for the other modes).
        policy: the run's precision policy.
        plan: which parts ``torch.compile`` fuses (:func:`~lptfl.experiment.setup.compile_plan`; with
            ``one_client_round``, for a process that trains one client's round, a Flower ClientApp's).
        model: a fresh model of the run (the simulator's local trainer trains this one).
        initial: its initial state, the server's model before round 1.
        full_precision: state entries that travel exactly.
    """

    def __init__(self, config: RunConfig, *, one_client_round: bool = False) -> None:
        config.validate()
        self.config = config
        self.device = torch.device(config.device)
        self.data = load_dataset(config.dataset, config.data_path, download=config.download,
                                 verify=not config.no_verify)
        labels = self.data.train_y.numpy()
        self.parts, val = split_clients(config, labels)  # no client trains on ABAvg's validation data
        self.val_x, self.val_y = validation_data(config, self.data, val)
        log.info("partition:\n%s", partition_summary(labels, self.parts, self.data.num_classes))
        empty = sum(len(part) == 0 for part in self.parts)
        if empty:
            log.warning("%d of %d clients hold no training samples (--partition %s, --alpha %g): when sampled they "
                        "send the served model back unchanged", empty, len(self.parts), config.partition, config.alpha)
        self.policy = config.policy()
        self.plan = compile_plan(config, [len(p) for p in self.parts], len(self.data.test_y), self.device,
                                 self.policy.is_full_precision, one_client_round=one_client_round)
        log.info("torch.compile: training step %s, evaluation %s (%s)", "on" if self.plan.train else "off",
                 "on" if self.plan.eval else "off", self.plan.reason)
        self.model = build_run_model(config, self.data)
        self.initial = {k: v.clone() for k, v in self.model.state_dict().items()}
        self.full_precision = full_precision_names(self.model)

    @functools.cached_property
    def scorer(self) -> ServedModelScorer:
        """Scores the served model; its model also serves ABAvg's scorer and FedBN's vote."""
        return ServedModelScorer(self.config, self.data, self.device, compile=self.plan.eval)

    def client_data(self, client: int) -> tuple[torch.Tensor, torch.Tensor]:
        """``(x, y)`` of ``client``'s training samples."""
        index = torch.from_numpy(self.parts[client])
        return self.data.train_x[index], self.data.train_y[index]

    def client_algorithm(self, model: torch.nn.Module) -> ClientAlgorithm:
        """The client side of the run's FL algorithm for ``model`` (a fresh model of the run)."""
        return ClientAlgorithm(self.config, model, num_classes=self.data.num_classes, device=self.device)

    def new_server(self, initial: Mapping[str, torch.Tensor] | None = None) -> tuple[Server, ServerAlgorithm]:
        """A server holding ``initial`` (default: :attr:`initial`) and the run's FL algorithm set up on it."""
        cfg = self.config
        server = Server(self.initial if initial is None else initial, cfg.server_config(),
                        full_precision=self.full_precision)
        scorer = None
        if self.val_x is not None:
            scorer = accuracy_scorer(self.scorer.model, self.val_x, self.val_y, batch_size=cfg.test_batch_size,
                                     forward=self.scorer.forward)
        algorithm = ServerAlgorithm(cfg, server, self.model, num_classes=self.data.num_classes,
                                    input_shape=self.data.input_shape, make_fp32_model=self.make_fp32_model,
                                    seed_for=self.seed_for, scorer=scorer)
        return server, algorithm

    def seed_for(self, *parts: int) -> int:
        """A seed derived from the run's seed and ``parts`` (e.g. a round and a tag)."""
        return derive_seed(self.config.seed, *parts)

    def make_fp32_model(self) -> torch.nn.Module:
        """A fresh full-precision model of the run (no quantizers), for server-side work such as
        FedFTG's fine-tuning."""
        return build_run_model(self.config, self.data).to(self.device)
