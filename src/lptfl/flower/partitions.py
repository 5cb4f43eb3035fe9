"""Which SuperNode holds which data partition, as the ServerApp assigns them.

A SuperNode's node config names its partition (``partition-id``, ``num-partitions``). Before
round 1 the ServerApp asks every connected node once (a ``query`` message answered by
:func:`lptfl.flower.client_app.query`) and keeps one node per partition; from then on it
samples partitions as the simulator samples clients, sends each node the partition it was
assigned, and accepts an update only if it names that partition
(:class:`lptfl.flower.run_strategy.RunStrategy`). A node whose answer is malformed, out of
range, disagrees with the others on the number of partitions, or claims a partition another
node already holds is logged and never sampled.
"""

from __future__ import annotations

import logging
import time
from collections import Counter
from dataclasses import dataclass

from flwr.app import Message, MetricRecord, RecordDict
from flwr.serverapp import Grid

log = logging.getLogger(__name__)

QUERY = "query"
METRICS_RECORD = "metrics"


@dataclass(frozen=True)
class PartitionMap:
    """``node_of[partition]``: the node assigned each partition; ``count``: partitions in all."""

    node_of: dict[int, int]
    count: int

    def partition_of(self, node: int) -> int | None:
        """The partition assigned ``node`` (None: none)."""
        return next((p for p, n in self.node_of.items() if n == node), None)


def wait_for_nodes(grid: Grid, count: int, timeout: float) -> list[int]:
    """Node ids once at least ``count`` SuperNodes are connected (RuntimeError after ``timeout`` s; 0: no limit)."""
    deadline = time.monotonic() + timeout if timeout else None
    while True:
        nodes = sorted(int(n) for n in grid.get_node_ids())
        if len(nodes) >= count:
            return nodes
        if deadline is not None and time.monotonic() > deadline:
            raise RuntimeError(f"only {len(nodes)} of {count} SuperNodes connected after {timeout:.0f} s")
        time.sleep(0.5)


def read_claim(reply: Message, max_partitions: int) -> tuple[int, int]:
    """``(partition-id, num-partitions)`` of a query reply.

    Raises:
        ValueError: the reply holds no such integers, or ``not 0 <= partition-id < num-partitions
            <= max_partitions``.
    """
    record = reply.content.metric_records.get(METRICS_RECORD) if METRICS_RECORD in reply.content else None
    if not isinstance(record, MetricRecord):
        raise ValueError(f"expected a MetricRecord {METRICS_RECORD!r}")
    values = [record.get(key) for key in ("partition-id", "num-partitions")]
    if any(isinstance(v, bool) or not isinstance(v, int) for v in values):
        raise ValueError(f"partition-id and num-partitions must be integers, got {values}")
    partition, count = values
    if not 0 <= partition < count <= max_partitions:
        raise ValueError(f"expected 0 <= partition-id < num-partitions <= {max_partitions}, got {partition} and {count}")
    return partition, count


def discover_partitions(grid: Grid, nodes: list[int], *, timeout: float | None, max_partitions: int) -> PartitionMap:
    """Ask ``nodes`` for their partitions; one node per partition (the lowest node id first).

    Raises:
        RuntimeError: no node gave a usable answer.
    """
    messages = [Message(content=RecordDict(), dst_node_id=n, message_type=QUERY) for n in nodes]
    replies = list(grid.send_and_receive(messages, timeout=timeout))
    sent_to = {m.metadata.message_id: m.metadata.dst_node_id for m in messages}
    claims: dict[int, tuple[int, int]] = {}
    for reply in replies:
        node = sent_to.get(reply.metadata.reply_to_message_id)
        try:
            if node is None or reply.metadata.src_node_id != node:
                raise ValueError("a reply to no query of this server")
            if reply.has_error():
                raise ValueError(f"error {reply.error.code}: {reply.error.reason}")
            claims[node] = read_claim(reply, max_partitions)
        except ValueError as err:
            log.warning("node %s did not report a usable partition (%s); it will not be sampled", node, err)
    answered = {sent_to.get(r.metadata.reply_to_message_id) for r in replies}
    for node in sorted(set(nodes) - answered):
        log.warning("node %s did not report its partition; it will not be sampled", node)
    if not claims:
        raise RuntimeError(f"none of the {len(nodes)} SuperNodes reported a usable partition; each needs "
                           "--node-config \"partition-id=I num-partitions=N\"")
    count = Counter(c for _, c in claims.values()).most_common(1)[0][0]
    node_of: dict[int, int] = {}
    for node in sorted(claims):
        partition, claimed_count = claims[node]
        if claimed_count != count:
            log.warning("node %s reports %d partitions, the others %d; it will not be sampled", node, claimed_count, count)
        elif partition in node_of:
            log.warning("node %s claims partition %d of node %s; it will not be sampled", node, partition,
                        node_of[partition])
        else:
            node_of[partition] = node
    return PartitionMap(node_of=node_of, count=count)
