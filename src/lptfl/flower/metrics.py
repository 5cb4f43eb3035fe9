"""One line of ``metrics.jsonl`` from the Flower driver: the simulator's fields plus the
federation's failures."""

from __future__ import annotations

from dataclasses import dataclass, field

from lptfl.experiment.results import RoundMetrics


@dataclass
class FlowerRoundMetrics(RoundMetrics):
    """:class:`~lptfl.experiment.results.RoundMetrics` plus the federation's view.

    ``clients`` are the partition ids whose updates were accepted; ``failed`` counts the
    sampled nodes without a usable reply and ``failed_clients`` lists their node ids;
    ``skipped`` marks a round with fewer accepted updates than ``min-clients`` (models
    unchanged).

    Attributes:
        errors: error replies (a ClientApp exception, an unreachable node).
        missing: sampled nodes that did not reply within the round timeout.
        nodes: the Flower node ids the round was sent to.
        state_restored: accepted clients that resumed their optimizer state kept on their node.
    """

    errors: int = 0
    missing: int = 0
    nodes: list[int] = field(default_factory=list)
    state_restored: int = 0
