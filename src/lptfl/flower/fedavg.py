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
and ``Result.arrays`` see an ordinary state dict. What happened to each sampled node's reply is
kept in ``last_round`` (:class:`TrainRound`).

A subclass adapts the rounds through a few hooks (lptfl's own ServerApp,
:mod:`lptfl.flower.run_strategy`, is one): :meth:`~LowPrecisionFedAvg.new_server`,
:meth:`~LowPrecisionFedAvg.sample_train_nodes`, :meth:`~LowPrecisionFedAvg.node_train_config`,
:meth:`~LowPrecisionFedAvg.extra_downlink`, :meth:`~LowPrecisionFedAvg.check_reply`,
:meth:`~LowPrecisionFedAvg.begin_aggregation` and :meth:`~LowPrecisionFedAvg.end_aggregation`.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field

import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict
from flwr.common.logger import log as flower_log
from flwr.serverapp import Grid
from flwr.serverapp.exception import InconsistentMessageReplies
from flwr.serverapp.strategy import FedAvg
from flwr.serverapp.strategy.strategy_utils import sample_nodes

from lptfl.codec import PayloadError
from lptfl.fl import Server, ServerConfig, arguments
from lptfl.fl.server import RoundStats
from lptfl.fl.server_optim import ServerOptimizer
from lptfl.flower.payload import MODEL_RECORD_KEY, UPLINK_FORMAT_KEY, format_label, from_record, to_record
from lptfl.quant import PrecisionPolicy

log = logging.getLogger(__name__)

MetricsAggregator = Callable[[list[RecordDict], str], MetricRecord]
ConfigValue = int | float | str | bool | list

ACCEPTED, REJECTED, ERROR, MISSING = "accepted", "rejected", "error", "missing"


@dataclass
class ReplyOutcome:
    """What became of one sampled node's train message.

    Attributes:
        node: the node the message was sent to.
        status: ``"accepted"``, ``"rejected"`` (malformed or invalid), ``"error"`` (an error
            reply) or ``"missing"`` (no reply within the round's timeout).
        client: the id the client is known by (:meth:`LowPrecisionFedAvg.check_reply`).
        reason: why it was not accepted.
        metrics: the MetricRecord of an accepted reply.
    """

    node: int
    status: str
    client: int | str | None = None
    reason: str = ""
    metrics: MetricRecord | None = None


@dataclass
class TrainRound:
    """One training round as the strategy saw it.

    Attributes:
        round: the server round.
        sent: the nodes sent a train message.
        outcomes: one per sampled node, in the order the messages were sent (then any reply
            to no message of the round).
        bytes_down_per_client: payload bytes each sampled node was sent (model and extras).
        stats: the aggregation server's view (bytes of each decoded update, rejections).
        updated: False if the round was skipped (the models are unchanged).
    """

    round: int
    sent: list[int] = field(default_factory=list)
    outcomes: list[ReplyOutcome] = field(default_factory=list)
    bytes_down_per_client: int = 0
    stats: RoundStats = field(default_factory=RoundStats)
    updated: bool = False

    def count(self, status: str) -> int:
        return sum(o.status == status for o in self.outcomes)


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
        max_weight: replies whose ``weighted_by_key`` exceeds this are rejected, so that one
            client claiming a huge example count cannot dominate the weighted mean (None: no limit).
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

    Raises:
        TypeError: an argument has the wrong type (named in the message).
        ValueError: an argument is out of its range (named in the message).
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
        max_weight: float | None = None,
        max_update_norm: float | None = None,
        robust: str = "none",
        trim_fraction: float = 0.1,
        max_payload_bytes: int = 1 << 30,
        server_optimizer: ServerOptimizer | None = None,
        proximal_mu: float = 0.0,
        seed: int = 0,
    ) -> None:
        arguments.precision_policy(policy)
        arguments.instance("server_optimizer", server_optimizer, ServerOptimizer,
                           'ServerOptimizer("fedadam", names=...)', optional=True)
        for name, value in (("fraction_train", fraction_train), ("fraction_evaluate", fraction_evaluate)):
            arguments.number(name, value, low=0.0, high=1.0)
        arguments.integer("min_accepted", min_accepted, minimum=1)  # ServerConfig's min_clients
        proximal_mu = arguments.number("proximal_mu", proximal_mu, low=0.0)
        if max_weight is not None:
            max_weight = arguments.number("max_weight", max_weight, low=0.0, low_open=True)
        super().__init__(
            fraction_train=fraction_train, fraction_evaluate=fraction_evaluate, min_train_nodes=min_train_nodes,
            min_evaluate_nodes=min_evaluate_nodes, min_available_nodes=min_available_nodes,
            weighted_by_key=weighted_by_key, arrayrecord_key=arrayrecord_key, configrecord_key=configrecord_key,
            train_metrics_aggr_fn=train_metrics_aggr_fn, evaluate_metrics_aggr_fn=evaluate_metrics_aggr_fn,
        )
        self.policy = policy
        self.server_config = ServerConfig(
            moving_average=moving_average, moving_weight=moving_weight, ma_start=ma_start,
            weighting=weighting,
            downlink=policy.downlink, uplink=policy.uplink, max_payload_bytes=max_payload_bytes,
            min_clients=min_accepted, max_update_norm=max_update_norm, robust=robust, trim_fraction=trim_fraction,
            seed=seed,
        )
        self.full_precision = arguments.names("full_precision", full_precision)
        self.server_optimizer = server_optimizer
        self.proximal_mu = proximal_mu
        self.max_weight = max_weight
        self.server: Server | None = None
        self.last_round: TrainRound | None = None
        self._downlink: tuple[int, bytes] | None = None  # (server round it encodes, payload)
        self._sent: list[Message] = []  # this round's train messages (their ids are set when pushed)
        self._extra_bytes = 0

    def summary(self) -> None:
        """Log the configuration (Flower's, then lptfl's) to Flower's logger, where Flower prints
        the rest of the strategy's summary (a Flower app configures no handler for lptfl's loggers)."""
        super().summary()
        cfg = self.server_config
        flower_log(logging.INFO, "\tlptfl: downlink %s, uplink %s, weighting %s, moving average %s, "
                   "min accepted %d%s%s", format_label(cfg.downlink), format_label(cfg.uplink), cfg.weighting,
                   f"lambda={cfg.moving_weight} from round {cfg.ma_start}" if cfg.moving_average else "off",
                   cfg.min_clients,
                   "" if self.server_optimizer is None else f", server optimizer {self.server_optimizer.kind}",
                   f", proximal mu {self.proximal_mu}" if self.proximal_mu else "")

    # -- hooks ----------------------------------------------------------------------------------
    def new_server(self, arrays: ArrayRecord) -> Server:
        """Hook: a fresh aggregation server holding ``arrays`` (the initial model) as float state.

        Called in round 1; a subclass may configure the server it returns (e.g. FL-algorithm
        hooks of :class:`lptfl.fl.Server`).
        """
        initial = {k: torch.as_tensor(v).clone() for k, v in arrays.to_torch_state_dict().items()}
        unknown = sorted(set(self.full_precision) - set(initial))
        if unknown:
            raise ValueError(f"full_precision names entries that are not in initial_arrays: {unknown}")
        server = Server(initial, self.server_config, full_precision=self.full_precision)
        server.install(optimizer=self.server_optimizer)
        return server

    def sample_train_nodes(self, server_round: int, grid: Grid) -> list[int]:
        """Hook: the nodes that train in ``server_round`` (FedAvg's sampling by ``fraction_train``,
        ``min_train_nodes`` and ``min_available_nodes``)."""
        sample_size = max(int(len(list(grid.get_node_ids())) * self.fraction_train), self.min_train_nodes)
        nodes, connected = sample_nodes(grid, self.min_available_nodes, sample_size)
        log.info("configure_train: sampled %d nodes (out of %d)", len(nodes), len(connected))
        return nodes

    def node_train_config(self, server_round: int, node_id: int) -> Mapping[str, ConfigValue]:
        """Hook: entries added to the train config of ``node_id`` (none here)."""
        return {}

    def extra_downlink(self, server_round: int) -> Mapping[str, bytes]:
        """Hook: payloads sent with the model, ``{record key: bytes}``, each as its own
        ArrayRecord in every train message and counted in ``bytes-down`` (none here)."""
        return {}

    def check_reply(self, server_round: int, node_id: int, metrics: MetricRecord) -> int | str:
        """Hook: check a reply's metrics beyond the weight; return the id the client is known by
        (here its node id). Raise :class:`~lptfl.codec.PayloadError` (or ``ValueError``) to reject it."""
        return node_id

    def begin_aggregation(self, server_round: int) -> None:
        """Hook: called before the round's replies are read (after ``Server.begin_round``)."""

    def end_aggregation(self, server_round: int, updated: bool) -> None:
        """Hook: called after ``Server.end_round`` (``updated``: False if the round was skipped)."""

    # -- the model ------------------------------------------------------------------------------
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
        """Sample nodes (:meth:`sample_train_nodes`) and send each the packed served model, the
        :meth:`extra_downlink` payloads and the config with its :meth:`node_train_config`.

        In round 1 (or before any round) the server is built from ``arrays``
        (:meth:`new_server`); later rounds serve the strategy's own model (``arrays`` is then
        what ``aggregate_train`` returned).
        """
        if self.server is None or server_round == 1:
            self.server, self._downlink = self.new_server(arrays), None
        self._sent, self._extra_bytes = [], 0
        if self.fraction_train == 0.0:
            return []
        config[UPLINK_FORMAT_KEY] = format_label(self.server_config.uplink)
        config[MODEL_RECORD_KEY] = self.arrayrecord_key
        config["server-round"] = server_round
        if self.proximal_mu:
            config["proximal-mu"] = self.proximal_mu
        model, _ = self._downlink_record()
        records: dict[str, ArrayRecord] = {self.arrayrecord_key: model}
        for key, payload in self.extra_downlink(server_round).items():
            if key in records or key == self.configrecord_key:
                raise ValueError(f"extra_downlink key {key!r} clashes with the model or config record")
            records[key] = to_record(payload)
            self._extra_bytes += len(payload)
        for node in self.sample_train_nodes(server_round, grid):
            node_config = ConfigRecord({**config, **self.node_train_config(server_round, node)})
            content = RecordDict({**records, self.configrecord_key: node_config})
            self._sent.append(Message(content=content, dst_node_id=node, message_type=MessageType.TRAIN))
        return list(self._sent)

    def _read_reply(self, reply: Message) -> tuple[bytes, float, MetricRecord]:
        """The packed update, its weight and its metrics; PayloadError if the reply is malformed."""
        content = reply.content
        arrays, metrics = list(content.array_records.values()), list(content.metric_records.values())
        if len(arrays) != 1 or len(metrics) != 1:
            raise PayloadError(f"expected one ArrayRecord and one MetricRecord, got {len(arrays)} and {len(metrics)}")
        for key, value in metrics[0].items():
            values = value if isinstance(value, list) else [value]
            if not all(isinstance(v, (int, float)) and math.isfinite(v) for v in values):
                raise PayloadError(f"metric {key!r} must be finite, got {value!r}")
        weight = metrics[0].get(self.weighted_by_key)
        if not _positive(weight):
            raise PayloadError(f"metric {self.weighted_by_key!r} must be a positive number, got {weight!r}")
        if self.max_weight is not None and weight > self.max_weight:
            raise PayloadError(f"metric {self.weighted_by_key!r} is {weight!r}, above the limit of {self.max_weight:g}")
        payload = from_record(arrays[0], max_bytes=self.server_config.max_payload_bytes)
        return payload, float(weight), metrics[0]

    def _take_reply(self, server_round: int, node: int, reply: Message) -> ReplyOutcome:
        """Validate one reply to node ``node``'s message and hand its update to the server."""
        assert self.server is not None
        if reply.has_error():
            log.warning("round %d: node %s replied with error %s: %s", server_round, node, reply.error.code,
                        reply.error.reason)
            return ReplyOutcome(node, ERROR, reason=f"error {reply.error.code}: {reply.error.reason}")
        try:
            if reply.metadata.src_node_id != node:
                raise PayloadError(f"the reply came from node {reply.metadata.src_node_id}")
            payload, weight, metrics = self._read_reply(reply)
            client = self.check_reply(server_round, node, metrics)
        except Exception as err:  # noqa: BLE001 - nothing a client sends may stop the server
            log.warning("round %d: rejected the reply of node %s: %s", server_round, node, err)
            return ReplyOutcome(node, REJECTED, reason=str(err) if isinstance(err, PayloadError) else repr(err))
        if not self.server.receive(payload, weight, client=client):
            return ReplyOutcome(node, REJECTED, client=client, reason=self.server.stats.reasons[-1])
        return ReplyOutcome(node, ACCEPTED, client=client, metrics=metrics)

    def aggregate_train(self, server_round: int, replies: Iterable[Message]) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Decode, validate and average the updates in float64; update the moving average.

        Replies are read in the order the messages were sent; one that answers no message of
        this round, comes from another node than the message went to, is malformed or fails
        :meth:`check_reply` is logged, counted as rejected and left out. What became of each
        sampled node is kept in ``last_round``.

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
        _, down_len = self._downlink_record()
        by_id = {m.metadata.message_id: i for i, m in enumerate(self._sent)}
        answers: list[Message | None] = [None] * len(self._sent)
        strays = []
        for reply in replies:
            index = by_id.get(reply.metadata.reply_to_message_id)
            if index is None or answers[index] is not None:
                strays.append(reply)
            else:
                answers[index] = reply
        server.begin_round()
        self.begin_aggregation(server_round)
        report = TrainRound(round=server_round, sent=[m.metadata.dst_node_id for m in self._sent],
                            bytes_down_per_client=down_len + self._extra_bytes)
        for message, reply in zip(self._sent, answers):
            node = message.metadata.dst_node_id
            report.outcomes.append(ReplyOutcome(node, MISSING, reason="no reply") if reply is None
                                   else self._take_reply(server_round, node, reply))
        for reply in strays:
            log.warning("round %d: ignored a reply of node %s to no train message of this round", server_round,
                        reply.metadata.src_node_id)
            report.outcomes.append(ReplyOutcome(reply.metadata.src_node_id, REJECTED,
                                                reason="a reply to no train message of this round"))
        report.updated = server.end_round()
        report.stats = server.stats
        self.end_aggregation(server_round, report.updated)
        self.last_round = report
        metrics = self._client_metrics([RecordDict({"metrics": o.metrics}) for o in report.outcomes
                                        if o.status == ACCEPTED])
        metrics.update({
            "bytes-down": report.bytes_down_per_client * len(report.sent),
            "bytes-down-per-client": report.bytes_down_per_client,
            "bytes-up": sum(report.stats.bytes_up),
            "accepted": report.count(ACCEPTED),
            "rejected": report.count(REJECTED),
            "failed": report.count(ERROR) + report.count(MISSING),
            "skipped": int(not report.updated),
        })
        return (self.served_arrays() if report.updated else None), metrics

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
        if self.fraction_evaluate == 0.0:
            return []
        if self.server is None:
            self.server, self._downlink = self.new_server(arrays), None
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
