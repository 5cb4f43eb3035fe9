"""lptfl's own ServerApp strategy: :class:`~lptfl.flower.LowPrecisionFedAvg` set up from a
:class:`~lptfl.experiment.config.RunConfig`, so that a Flower run is the simulator's run.

Through the strategy's hooks it adds what the simulator does beyond FedAvg:

- the aggregation settings of ``RunConfig.server_config()`` and the FL algorithm's server side
  (:class:`lptfl.fl.server_algorithm.ServerAlgorithm`: FedBN, ABAvg, FedGen, FedFTG, a server
  optimizer), set up on the strategy's :class:`lptfl.fl.Server`;
- client sampling by partition (``sample_clients`` over the partitions the SuperNodes hold,
  :mod:`lptfl.flower.partitions`), the round's learning rate and the node's assigned
  ``partition-id`` in each train config;
- FedGen's generator as an extra downlink record (counted in the bytes sent), with the
  round's ``fedgen-alpha``, ``fedgen-beta`` and ``fedgen-labels``;
- strict replies: ``partition-id`` must be the one assigned to the node, ``num-examples`` the
  size of that partition, ``train-loss`` a non-negative number and, for FedGen and FedFTG,
  ``label-counts`` one non-negative integer per class summing to ``num-examples``.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from dataclasses import replace

import torch
from flwr.app import ArrayRecord, MetricRecord
from flwr.serverapp import Grid
from torch import nn

from lptfl.codec import PayloadError
from lptfl.data import Dataset
from lptfl.experiment.config import RunConfig
from lptfl.experiment.setup import derive_seed, learning_rate, sample_clients, split_clients
from lptfl.fl import Server, full_precision_names
from lptfl.fl.server_algorithm import ServerAlgorithm
from lptfl.flower.fedavg import ConfigValue, LowPrecisionFedAvg
from lptfl.flower.partitions import PartitionMap
from lptfl.flower.payload import GENERATOR_RECORD

log = logging.getLogger(__name__)

State = dict[str, torch.Tensor]


class RunStrategy(LowPrecisionFedAvg):
    """The strategy of lptfl's ServerApp for one run.

    Args:
        config: the run's settings.
        data: the run's dataset (partition sizes, classes, input shape).
        model: a fresh model of the run (names of parameters, buffers and batch norms).
        eval_model: the model that scores the served model (ABAvg's scorer uses it too).
        make_fp32_model: builds a fresh full-precision model (FedFTG).
        scorer: ABAvg's ``state -> weight`` (validation accuracy), else None.
    """

    def __init__(self, config: RunConfig, data: Dataset, *, model: nn.Module, eval_model: nn.Module,
                 make_fp32_model: Callable[[], nn.Module], scorer: Callable[[State], float] | None = None) -> None:
        settings = config.server_config()
        super().__init__(
            policy=config.policy(), fraction_evaluate=0.0, min_train_nodes=1, min_available_nodes=1,
            weighting=settings.weighting, moving_average=settings.moving_average,
            moving_weight=settings.moving_weight, ma_start=settings.ma_start,
            full_precision=full_precision_names(model), min_accepted=settings.min_clients,
            max_update_norm=settings.max_update_norm, robust=settings.robust, trim_fraction=settings.trim_fraction,
            max_payload_bytes=settings.max_payload_bytes, seed=settings.seed,
            # lptfl's FedProx term is lambda ||w - w_global||^2, Flower's (mu / 2) ||w - w_global||^2
            proximal_mu=2 * config.lambda_fedprox if config.aggregation_mode == "fedprox" else 0.0,
        )
        self.config, self.data = config, data
        self._model, self._eval_model, self._make_fp32_model, self._scorer = model, eval_model, make_fp32_model, scorer
        self.algorithm: ServerAlgorithm | None = None
        self.partitions = PartitionMap(node_of={}, count=0)
        self._sizes: list[int] = []

    def assign(self, partitions: PartitionMap) -> None:
        """Train on ``partitions`` (one node per partition) from now on."""
        parts, _ = split_clients(replace(self.config, num_clients=partitions.count), self.data.train_y.numpy())
        self.partitions, self._sizes = partitions, [len(p) for p in parts]
        missing = sorted(set(range(partitions.count)) - set(partitions.node_of))
        if missing:
            log.warning("no SuperNode holds partition(s) %s; they are never trained", missing)

    def learning_rate(self, server_round: int) -> float:
        """The clients' learning rate in ``server_round`` (``--lr`` under ``--lr_schedule``)."""
        cfg = self.config
        return learning_rate(cfg.lr, cfg.lr_schedule, server_round, cfg.c_rounds)

    # -- hooks of LowPrecisionFedAvg ------------------------------------------------------------
    def new_server(self, arrays: ArrayRecord) -> Server:
        """The server with the run's FL algorithm set up on it."""
        server = super().new_server(arrays)
        cfg = self.config
        self.algorithm = ServerAlgorithm(
            cfg, server, self._eval_model, num_classes=self.data.num_classes, input_shape=self.data.input_shape,
            make_fp32_model=self._make_fp32_model, seed_for=lambda *parts: derive_seed(cfg.seed, *parts),
            scorer=self._scorer)
        return server

    def sample_train_nodes(self, server_round: int, grid: Grid) -> list[int]:
        """The nodes of the partitions ``sample_clients`` picks (as the simulator picks clients)."""
        if not self.partitions.node_of:
            raise RuntimeError("no partitions assigned; call assign() before the first round")
        wanted = sample_clients(self.partitions.count, self.config.frac, self.config.seed, server_round)
        return [self.partitions.node_of[p] for p in wanted if p in self.partitions.node_of]

    def node_train_config(self, server_round: int, node_id: int) -> Mapping[str, ConfigValue]:
        values: dict[str, ConfigValue] = {"lr": float(self.learning_rate(server_round)),
                                          "partition-id": self.partitions.partition_of(node_id)}
        if self.algorithm is not None and self.algorithm.fedgen is not None:
            alpha, beta, labels = self.algorithm.fedgen_round(server_round)
            values.update({"fedgen-alpha": float(alpha), "fedgen-beta": float(beta), "fedgen-labels": labels})
        return values

    def extra_downlink(self, server_round: int) -> Mapping[str, bytes]:
        payload = None if self.algorithm is None else self.algorithm.generator_payload(self.server_config.downlink)
        return {} if payload is None else {GENERATOR_RECORD: payload}

    def check_reply(self, server_round: int, node_id: int, metrics: MetricRecord) -> int:
        """The reply's partition id, after checking every field against what the server knows."""
        partition = _integer(metrics, "partition-id")
        assigned = self.partitions.partition_of(node_id)
        if partition != assigned:
            raise PayloadError(f"partition-id {partition} is not the partition {assigned} assigned to node {node_id}")
        examples = _integer(metrics, self.weighted_by_key)
        if examples != self._sizes[partition]:
            raise PayloadError(f"{self.weighted_by_key} {examples} is not the {self._sizes[partition]} samples "
                               f"of partition {partition}")
        loss = metrics.get("train-loss")
        if isinstance(loss, bool) or not isinstance(loss, (int, float)) or not loss >= 0:
            raise PayloadError(f"train-loss must be a non-negative number, got {loss!r}")
        if self.algorithm is not None and self.algorithm.needs_label_counts:
            self.algorithm.report_counts(partition, self._label_counts(metrics, examples))
        return partition

    def _label_counts(self, metrics: MetricRecord, examples: int) -> torch.Tensor:
        counts = metrics.get("label-counts")
        classes = self.data.num_classes
        if (not isinstance(counts, list) or len(counts) != classes
                or any(isinstance(c, bool) or not isinstance(c, int) or c < 0 for c in counts)
                or sum(counts) != examples):
            raise PayloadError(f"label-counts must be {classes} non-negative integers summing to {examples}, "
                               f"got {counts!r}")
        return torch.tensor(counts, dtype=torch.int64)

    def begin_aggregation(self, server_round: int) -> None:
        if self.algorithm is not None:
            self.algorithm.begin_round()

    def end_aggregation(self, server_round: int, updated: bool) -> None:
        if self.algorithm is not None:
            self.algorithm.end_round()


def _integer(metrics: MetricRecord, key: str) -> int:
    value = metrics.get(key)
    if isinstance(value, bool) or not isinstance(value, int):
        raise PayloadError(f"{key} must be an integer, got {value!r}")
    return value
