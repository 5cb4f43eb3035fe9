"""The server side of a round over a Flower ``Grid``: a thin driver of :class:`lptfl.fl.Server`.

The FL algorithm's server side is :class:`lptfl.fl.server_algorithm.ServerAlgorithm` (FedGen's
generator rides along with the downlink; label counts reported by the clients go to it before
their updates). Per round: the served model is encoded once by
``Server.downlink()`` and sent to the sampled nodes; each reply's payload bytes go to
``Server.receive`` (which decodes, validates and adds them in float64, or logs, counts and
skips a bad one); ``Server.end_round`` skips a round with fewer accepted updates than
``ServerConfig.min_clients`` (``--min_clients``), keeping the old model.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

import torch
from flwr.app import ConfigRecord, Message, RecordDict
from flwr.serverapp import Grid

from lptfl.codec import PayloadError
from lptfl.fl import Server
from lptfl.fl.server_algorithm import ServerAlgorithm
from lptfl.flower.payload import PAYLOAD_RECORD, from_record, to_record

log = logging.getLogger(__name__)

TRAIN = "train"
QUERY = "query"
CONFIG_RECORD = "config"
METRICS_RECORD = "metrics"
GENERATOR_RECORD = "fedgen-generator"


@dataclass
class RoundOutcome:
    """What one round over the federation produced (before evaluation)."""

    round: int
    sent: int
    bytes_down_per_client: int
    accepted: int = 0
    rejected: int = 0
    errors: int = 0
    missing: int = 0
    skipped: bool = False  # too few accepted updates: the server kept the old model
    rejected_norm: int = 0
    failed_nodes: list[int] = field(default_factory=list)
    clients: list[int] = field(default_factory=list)
    bytes_up: list[int] = field(default_factory=list)
    reasons: list[str] = field(default_factory=list)
    restored: int = 0  # accepted clients that resumed their optimizer state from an earlier round
    loss_sum: float = 0.0
    sample_sum: int = 0

    @property
    def train_loss(self) -> float:
        return self.loss_sum / max(self.sample_sum, 1)


def exchange(grid: Grid, messages: Sequence[Message], *, timeout: float | None, poll_s: float = 0.5) -> dict[str, Message]:
    """Push ``messages`` and pull replies until all arrived or ``timeout`` passed.

    Returns:
        ``{message_id of the sent message: its reply}`` (matched by ``reply_to_message_id``:
        an error reply produced by the SuperLink has the SuperLink as sender).
    """
    ids = [i for i in grid.push_messages(messages) if i]
    waiting = set(ids)
    replies: dict[str, Message] = {}
    deadline = None if not timeout else time.monotonic() + timeout
    while waiting:
        for reply in grid.pull_messages(list(waiting)):
            key = reply.metadata.reply_to_message_id
            if key in waiting:
                replies[key] = reply
                waiting.discard(key)
        if not waiting or (deadline is not None and time.monotonic() >= deadline):
            break
        time.sleep(poll_s)
    return replies


def _int_metric(metrics, key: str) -> int:
    value = metrics[key]
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value != value or value < 0:
        raise PayloadError(f"metric {key!r} must be a non-negative number, got {value!r}")
    return int(value)


class RoundDriver:
    """Runs rounds of :class:`lptfl.fl.Server` over a Flower ``Grid``.

    Args:
        server: the aggregation server (holds the models).
        round_timeout: seconds to wait for replies (None or 0: no limit).
    """

    def __init__(self, server: Server, *, round_timeout: float | None = None,
                 algorithm: ServerAlgorithm | None = None, num_classes: int = 0) -> None:
        self.server = server
        self.round_timeout = round_timeout or None
        self.algorithm = algorithm
        self.num_classes = num_classes

    def train_messages(self, nodes: Iterable[int], round_index: int, lr: float) -> tuple[list[Message], int]:
        """One train message per node carrying the downlink payload (and FedGen's generator);
        and the bytes each node receives."""
        down = self.server.downlink()
        settings: dict = {"round": round_index, "lr": float(lr)}
        records = {PAYLOAD_RECORD: to_record(down)}
        size = len(down)
        generator = None if self.algorithm is None else self.algorithm.generator_payload(self.server.config.downlink)
        if generator is not None:
            alpha, beta, labels = self.algorithm.fedgen_round(round_index)
            settings.update({"fedgen-alpha": alpha, "fedgen-beta": beta, "fedgen-labels": labels})
            records[GENERATOR_RECORD] = to_record(generator)
            size += len(generator)
        messages = []
        for node in nodes:
            content = RecordDict({**records, CONFIG_RECORD: ConfigRecord(settings)})
            messages.append(Message(content=content, dst_node_id=int(node), message_type=TRAIN))
        return messages, size

    def _label_counts(self, metrics) -> torch.Tensor:
        counts = metrics["label-counts"]
        if (not isinstance(counts, list) or len(counts) != self.num_classes
                or any(isinstance(c, bool) or not isinstance(c, int) or c < 0 for c in counts)):
            raise PayloadError(f"label-counts must be {self.num_classes} non-negative integers, got {counts!r}")
        return torch.tensor(counts, dtype=torch.int64)

    def aggregate(self, outcome: RoundOutcome, sent: dict[str, int], replies: dict[str, Message]) -> RoundOutcome:
        """Feed the replies of a round into the server and close the round.

        Args:
            outcome: the round's record so far (``sent``, ``bytes_down_per_client``).
            sent: ``{message id: destination node id}`` of the train messages.
            replies: ``{message id of the sent message: reply}``.
        """
        server = self.server
        server.begin_round()
        if self.algorithm is not None:
            self.algorithm.begin_round()
        for message_id, node in sent.items():
            reply = replies.get(message_id)
            if reply is None:
                outcome.missing += 1
                outcome.failed_nodes.append(node)
                outcome.reasons.append(f"node {node}: no reply")
                continue
            if reply.has_error():
                outcome.errors += 1
                outcome.failed_nodes.append(node)
                outcome.reasons.append(f"node {node}: error {reply.error.code}: {reply.error.reason}")
                log.warning("node %s replied with error %s: %s", node, reply.error.code, reply.error.reason)
                continue
            try:
                content = reply.content
                payload = from_record(content.array_records[PAYLOAD_RECORD], max_bytes=server.config.max_payload_bytes)
                metrics = content.metric_records[METRICS_RECORD]
                num_samples = _int_metric(metrics, "num-samples")
                client = _int_metric(metrics, "partition-id")
                loss = float(metrics["train-loss"])
                restored = bool(metrics.get("state-restored", 0))
                if not math.isfinite(loss):
                    raise ValueError(f"train-loss {loss} is not finite")
                if self.algorithm is not None and self.algorithm.needs_label_counts:
                    self.algorithm.report_counts(client, self._label_counts(metrics))
            except (KeyError, PayloadError, TypeError, ValueError) as err:
                server.stats.rejected += 1
                server.stats.reasons.append(f"node {node}: malformed reply: {err!r}")
                log.warning("rejected the reply of node %s: malformed (%r)", node, err)
                continue
            if server.receive(payload, num_samples, client):
                outcome.clients.append(client)
                outcome.restored += int(restored)
                outcome.loss_sum += loss * num_samples
                outcome.sample_sum += num_samples
        server.end_round()  # skips the round (models unchanged) below ServerConfig.min_clients
        if self.algorithm is not None:
            self.algorithm.end_round()
        stats = server.stats
        outcome.skipped = bool(getattr(stats, "skipped", False))
        outcome.rejected_norm = int(getattr(stats, "rejected_norm", 0))
        outcome.accepted = stats.accepted
        outcome.rejected = stats.rejected
        outcome.bytes_up = list(stats.bytes_up)
        outcome.reasons = outcome.reasons + list(stats.reasons)
        outcome.clients.sort()
        return outcome

    def run_round(self, grid: Grid, nodes: Sequence[int], round_index: int, lr: float) -> RoundOutcome:
        """Send the downlink to ``nodes``, collect and aggregate their updates."""
        messages, down_len = self.train_messages(nodes, round_index, lr)
        replies = exchange(grid, messages, timeout=self.round_timeout)
        sent = {m.metadata.message_id: m.metadata.dst_node_id for m in messages}
        outcome = RoundOutcome(round=round_index, sent=len(messages), bytes_down_per_client=down_len)
        return self.aggregate(outcome, sent, replies)
