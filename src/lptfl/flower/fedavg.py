"""``LowPrecisionFedAvg``: Flower's FedAvg with lptfl's packed payloads, float64 aggregation and
the server moving average.

A drop-in for ``flwr.serverapp.strategy.FedAvg`` in any ServerApp::

    strategy = LowPrecisionFedAvg(policy=PrecisionPolicy.low_precision(8), moving_average=True)
    result = strategy.start(grid=grid, initial_arrays=ArrayRecord(model.state_dict()), num_rounds=3)

Flower's FedAvg does the sampling, the messages and the metric averaging; the model is held
by an :class:`lptfl.fl.Server` built from ``initial_arrays`` in round 1. Each round the
served model (the moving average once it exists) is quantized and packed once
(``Server.downlink``) and sent as one uint8 array; each reply's packed update is decoded and
validated (names, shapes, dtypes, finite values, the run's uplink format), a bad one is
logged, counted and skipped, the good ones are averaged in float64, optionally passed
through a server optimizer (FedAvgM/FedAdam/FedYogi), and folded into the moving average.
``aggregate_train`` returns the served model as a plain float ArrayRecord, so ``evaluate_fn``
and ``Result.arrays`` see an ordinary state dict.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Iterable

import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.serverapp import Grid
from flwr.serverapp.exception import InconsistentMessageReplies
from flwr.serverapp.strategy import FedAvg

from lptfl.codec import PayloadError
from lptfl.fl import Server, ServerConfig
from lptfl.fl.server_optim import ServerOptimizer
from lptfl.flower.payload import UPLINK_FORMAT_KEY, format_label, from_record, to_record
from lptfl.quant import PrecisionPolicy

log = logging.getLogger(__name__)

MetricsAggregator = Callable[[list[RecordDict], str], MetricRecord]


class LowPrecisionFedAvg(FedAvg):
    """FedAvg whose messages carry lptfl-wire payloads (see the module docstring).

    Flower's parameters (``fraction_train`` ... ``evaluate_metrics_aggr_fn``) mean what they
    mean in ``FedAvg``; ``min_*_nodes`` govern sampling only. The others:

    Args:
        policy: the run's precision: ``policy.downlink`` packs the served model,
            ``policy.uplink`` is the only format accepted from the clients.
        weighting: ``"samples"`` (weight each update by its ``weighted_by_key`` metric, as
            FedAvg) or ``"uniform"``.
        moving_average: keep the server moving average ``wbar = lambda wbar + (1 - lambda) w``
            and serve (and evaluate) it instead of the latest aggregate ``w``.
        moving_weight: lambda, in [0, 1).
        ma_start: first round (1-based) whose aggregate enters the average.
        full_precision: state entries that travel exactly, e.g. batch-norm running statistics
            (``lptfl.fl.full_precision_names(model)``); the clients send the same ones raw.
        min_accepted: a round with fewer valid updates is skipped (the model stays).
        max_update_norm: reject an update farther than this (L2, all entries) from the
            served model (None: no limit).
        robust: ``"none"`` (weighted mean), ``"median"`` or ``"trimmed_mean"`` (coordinate-wise).
        trim_fraction: fraction trimmed at each end by ``"trimmed_mean"``.
        max_payload_bytes: uplinks longer than this are rejected unread.
        server_optimizer: turns the aggregate into the new model (FedAvgM, FedAdam, FedYogi;
            ``ServerOptimizer("fedadam", names=[n for n, _ in model.named_parameters()])``).
        proximal_mu: FedProx's mu, sent as ``proximal-mu`` in the train config; the client
            helper adds ``(mu / 2) ||w - w_global||^2`` to its loss (0: plain FedAvg).
        seed: seeds the downlink's stochastic rounding (when the policy rounds it so).
    """

    def __init__(
        self,
        *,
        policy: PrecisionPolicy,
        fraction_train: float = 1.0,
        fraction_evaluate: float = 1.0,
        min_train_nodes: int = 2,
        min_evaluate_nodes: int = 2,
        min_available_nodes: int = 2,
        weighted_by_key: str = "num-examples",
        arrayrecord_key: str = "arrays",
        configrecord_key: str = "config",
        train_metrics_aggr_fn: MetricsAggregator | None = None,
        evaluate_metrics_aggr_fn: MetricsAggregator | None = None,
        weighting: str = "samples",
        moving_average: bool = True,
        moving_weight: float = 0.9,
        ma_start: int = 1,
        full_precision: Iterable[str] = (),
        min_accepted: int = 1,
        max_update_norm: float | None = None,
        robust: str = "none",
        trim_fraction: float = 0.1,
        max_payload_bytes: int = 1 << 30,
        server_optimizer: ServerOptimizer | None = None,
        proximal_mu: float = 0.0,
        seed: int = 0,
    ) -> None:
        super().__init__(
            fraction_train=fraction_train, fraction_evaluate=fraction_evaluate, min_train_nodes=min_train_nodes,
            min_evaluate_nodes=min_evaluate_nodes, min_available_nodes=min_available_nodes,
            weighted_by_key=weighted_by_key, arrayrecord_key=arrayrecord_key, configrecord_key=configrecord_key,
            train_metrics_aggr_fn=train_metrics_aggr_fn, evaluate_metrics_aggr_fn=evaluate_metrics_aggr_fn,
        )
        if not isinstance(policy, PrecisionPolicy):
            raise TypeError(f"policy must be a PrecisionPolicy, got {type(policy).__name__}")
        if not proximal_mu >= 0:
            raise ValueError(f"proximal_mu must be >= 0, got {proximal_mu}")
        self.policy = policy
        self.server_config = ServerConfig(
            moving_average=moving_average, moving_weight=moving_weight, ma_start=ma_start,
            weighting=weighting,
            downlink=policy.downlink, uplink=policy.uplink, max_payload_bytes=max_payload_bytes,
            min_clients=min_accepted, max_update_norm=max_update_norm, robust=robust, trim_fraction=trim_fraction,
            seed=seed,
        )
        self.full_precision = list(full_precision)
        self.server_optimizer = server_optimizer
        self.proximal_mu = float(proximal_mu)
        self.server: Server | None = None
        self._downlink: tuple[int, bytes] | None = None  # (server round it encodes, payload)
        self._sent_train = 0

    def summary(self) -> None:
        """Log the configuration (Flower's, then lptfl's)."""
        super().summary()
        cfg = self.server_config
        log.info("lptfl: downlink %s, uplink %s, weighting %s, moving average %s, min accepted %d%s%s",
                 format_label(cfg.downlink), format_label(cfg.uplink), cfg.weighting,
                 f"lambda={cfg.moving_weight} from round {cfg.ma_start}" if cfg.moving_average else "off",
                 cfg.min_clients, "" if self.server_optimizer is None else f", server optimizer {self.server_optimizer.kind}",
                 f", proximal mu {self.proximal_mu}" if self.proximal_mu else "")

    # -- the model ------------------------------------------------------------------------------
    def _start(self, arrays: ArrayRecord) -> Server:
        """A fresh server holding ``arrays`` (the initial model) as float state."""
        initial = {k: torch.as_tensor(v).clone() for k, v in arrays.to_torch_state_dict().items()}
        unknown = sorted(set(self.full_precision) - set(initial))
        if unknown:
            raise ValueError(f"full_precision names entries that are not in initial_arrays: {unknown}")
        server = Server(initial, self.server_config, full_precision=self.full_precision)
        server.optimizer = self.server_optimizer
        return server

    def served_arrays(self) -> ArrayRecord:
        """The served model (the moving average once it exists) as a plain ArrayRecord."""
        if self.server is None:
            raise RuntimeError("no round has started yet")
        return ArrayRecord({k: v.detach().clone() for k, v in self.server.served_state().items()})

    def _downlink_record(self) -> tuple[ArrayRecord, int]:
        """The packed served model (encoded once per server round) and its length in bytes."""
        assert self.server is not None
        if self._downlink is None or self._downlink[0] != self.server.round:
            self._downlink = (self.server.round, self.server.downlink())
        payload = self._downlink[1]
        return to_record(payload), len(payload)

    # -- train ----------------------------------------------------------------------------------
    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid) -> Iterable[Message]:
        """Sample nodes as FedAvg and send each the packed served model.

        In round 1 (or before any round) the server is built from ``arrays``; later rounds
        serve the strategy's own model (``arrays`` is then what ``aggregate_train`` returned).
        """
        if self.server is None or server_round == 1:
            self.server, self._downlink = self._start(arrays), None
        config[UPLINK_FORMAT_KEY] = format_label(self.server_config.uplink)
        if self.proximal_mu:
            config["proximal-mu"] = self.proximal_mu
        record, _ = self._downlink_record()
        messages = list(super().configure_train(server_round, record, config, grid))
        self._sent_train = len(messages)
        return messages

    def _read_reply(self, reply: Message) -> tuple[bytes, float]:
        """The packed update and its weight metric; PayloadError if the reply is malformed."""
        content = reply.content
        arrays, metrics = list(content.array_records.values()), list(content.metric_records.values())
        if len(arrays) != 1 or len(metrics) != 1:
            raise PayloadError(f"expected one ArrayRecord and one MetricRecord, got {len(arrays)} and {len(metrics)}")
        payload = from_record(arrays[0], max_bytes=self.server_config.max_payload_bytes)
        weight = metrics[0].get(self.weighted_by_key)
        if not _positive(weight):
            raise PayloadError(f"metric {self.weighted_by_key!r} must be a positive number, got {weight!r}")
        return payload, float(weight)

    def aggregate_train(self, server_round: int, replies: Iterable[Message]) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Decode, validate and average the updates in float64; update the moving average.

        Returns:
            The served model (None if the round was skipped for want of ``min_accepted``
            valid updates) and the round's metrics: the clients' metrics averaged by
            ``train_metrics_aggr_fn`` over the accepted replies, plus ``bytes-down`` and
            ``bytes-up`` (payload bytes sent and received, all nodes), ``bytes-down-per-client``,
            ``accepted``, ``rejected``, ``failed`` (error replies and missing replies) and
            ``skipped`` (0/1).
        """
        if self.server is None:
            raise RuntimeError("aggregate_train() before configure_train()")
        server = self.server
        replies = list(replies)
        _, down_len = self._downlink_record()
        server.begin_round()
        accepted: list[RecordDict] = []
        errors = 0
        malformed: list[int] = []
        for reply in replies:
            node = reply.metadata.src_node_id
            if reply.has_error():
                errors += 1
                log.warning("round %d: node %s replied with error %s: %s", server_round, node,
                            reply.error.code, reply.error.reason)
                continue
            try:
                payload, weight = self._read_reply(reply)
            except PayloadError as err:
                malformed.append(node)
                log.warning("round %d: rejected the reply of node %s: %s", server_round, node, err)
                continue
            if server.receive(payload, weight, client=node):
                accepted.append(reply.content)
        updated = server.end_round()
        stats = server.stats
        metrics = self._client_metrics(accepted)
        missing = max(0, self._sent_train - len(replies))
        metrics.update({
            "bytes-down": down_len * self._sent_train,
            "bytes-down-per-client": down_len,
            "bytes-up": sum(stats.bytes_up),
            "accepted": stats.accepted,
            "rejected": stats.rejected + len(malformed),
            "failed": errors + missing,
            "skipped": int(stats.skipped),
        })
        return (self.served_arrays() if updated else None), metrics

    def _client_metrics(self, contents: list[RecordDict]) -> MetricRecord:
        if not contents:
            return MetricRecord()
        try:
            return self.train_metrics_aggr_fn(contents, self.weighted_by_key)
        except (KeyError, TypeError, ValueError) as err:  # clients that report different metrics
            log.warning("could not aggregate the clients' train metrics: %r", err)
            return MetricRecord()

    # -- evaluate -------------------------------------------------------------------------------
    def configure_evaluate(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                           grid: Grid) -> Iterable[Message]:
        """Sample nodes as FedAvg and send each the packed served model to score."""
        if self.server is None:
            self.server, self._downlink = self._start(arrays), None
        record, _ = self._downlink_record()
        return super().configure_evaluate(server_round, record, config, grid)

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> MetricRecord | None:
        """FedAvg's weighted mean of the evaluation metrics over the well-formed replies
        (one MetricRecord with a positive ``weighted_by_key``); the others are logged and skipped."""
        good = []
        for reply in replies:
            if reply.has_error():
                log.warning("round %d: evaluation error from node %s: %s", server_round,
                            reply.metadata.src_node_id, reply.error.reason)
                continue
            records = list(reply.content.metric_records.values())
            if len(records) != 1 or not _positive(records[0].get(self.weighted_by_key)):
                log.warning("round %d: skipped a malformed evaluation reply of node %s", server_round,
                            reply.metadata.src_node_id)
                continue
            good.append(reply)
        if not good:
            return None
        try:
            return super().aggregate_evaluate(server_round, good)
        except InconsistentMessageReplies as err:  # clients that report different metrics
            log.warning("round %d: could not aggregate the evaluation metrics: %s", server_round, err)
            return None


def _positive(value: object) -> bool:
    """Whether ``value`` is a finite number > 0 (a usable aggregation weight)."""
    return (not isinstance(value, bool) and isinstance(value, (int, float)) and math.isfinite(value)
            and value > 0)


__all__ = ["LowPrecisionFedAvg"]
