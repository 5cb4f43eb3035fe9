"""lptfl's own ServerApp strategy: :class:`~lptfl.flower.LowPrecisionFedAvg` set up from an
assembled run (:class:`~lptfl.experiment.assembly.RunAssembly`), so that a Flower run is the
simulator's run.

Through the strategy's hooks it adds what the simulator does beyond FedAvg:

- the run's server with its aggregation settings and its FL algorithm's server side
  (:class:`lptfl.fl.server_algorithm.ServerAlgorithm`: FedBN, ABAvg, FedGen, FedFTG, a server
  optimizer), built by the assembly as the simulator's is;
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
from collections.abc import Iterable, Mapping
from dataclasses import replace

import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord
from flwr.serverapp import Grid

from lptfl.codec import PayloadError
from lptfl.experiment.assembly import RunAssembly
from lptfl.experiment.setup import learning_rate, sample_clients, split_clients
from lptfl.fl import Server
from lptfl.fl.server_algorithm import ServerAlgorithm
from lptfl.flower.fedavg import ConfigValue, LowPrecisionFedAvg
from lptfl.flower.partitions import PartitionMap
from lptfl.flower.payload import GENERATOR_RECORD

log = logging.getLogger(__name__)


class RunStrategy(LowPrecisionFedAvg):
    """The strategy of lptfl's ServerApp for the assembled run ``run`` (its settings, dataset,
    precision policy and server)."""

    def __init__(self, run: RunAssembly) -> None:
        config = run.config
        super().__init__(
            policy=run.policy, fraction_evaluate=0.0, min_train_nodes=1, min_available_nodes=1,
            full_precision=run.full_precision,
            # lptfl's FedProx term is lambda ||w - w_global||^2, Flower's (mu / 2) ||w - w_global||^2
            proximal_mu=2 * config.lambda_fedprox if config.aggregation_mode == "fedprox" else 0.0,
        )
        self.server_config = config.server_config()  # the settings of the run's server (new_server)
        self.config, self.assembly = config, run
        self.algorithm: ServerAlgorithm | None = None
        self.partitions = PartitionMap(node_of={}, count=0)
        self._sizes: list[int] = []
        self.rounds_done = 0  # before Flower's round 1: more than 0 when the run resumed from a checkpoint

    def resume(self, server_state: Mapping[str, torch.Tensor], algorithm_state: Mapping[str, torch.Tensor]) -> None:
        """Continue the run from a checkpoint's server and algorithm state: Flower's round ``r`` is
        then the run's round ``rounds_done + r`` (its sampling, learning rate and seeds)."""
        self.server, self.algorithm = self.assembly.new_server()
        self.server.load_state_dict(server_state)
        self.algorithm.load_state_dict(algorithm_state)
        self.rounds_done = self.server.round

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                        grid: Grid) -> Iterable[Message]:
        return super().configure_train(self.rounds_done + server_round, arrays, config, grid)

    def aggregate_train(self, server_round: int,
                        replies: Iterable[Message]) -> tuple[ArrayRecord | None, MetricRecord | None]:
        return super().aggregate_train(self.rounds_done + server_round, replies)

    def assign(self, partitions: PartitionMap) -> None:
        """Train on ``partitions`` (one node per partition) from now on."""
        labels = self.assembly.data.train_y.numpy()
        parts, _ = split_clients(replace(self.config, num_clients=partitions.count), labels)
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
        """The run's server holding ``arrays``, with its FL algorithm set up on it."""
        server, self.algorithm = self.assembly.new_server(arrays.to_torch_state_dict())
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
        classes = self.assembly.data.num_classes
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
