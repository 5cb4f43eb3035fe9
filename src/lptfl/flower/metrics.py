"""One line of ``metrics.jsonl`` from the Flower driver: the simulator's fields plus the
federation's failures."""

from __future__ import annotations

from dataclasses import dataclass, field

from lptfl.experiment.results import RoundMetrics
from lptfl.experiment.round_metrics import round_metrics
from lptfl.flower.fedavg import ACCEPTED, ERROR, MISSING, REJECTED, TrainRound


@dataclass
class FlowerRoundMetrics(RoundMetrics):
    """:class:`~lptfl.experiment.results.RoundMetrics` plus the federation's view.

    ``clients`` are the partition ids whose updates were accepted; ``failed`` counts the
    sampled nodes without a usable reply and ``failed_clients`` lists their node ids;
    ``rejected`` counts every reply refused, malformed ones included; ``skipped`` marks a
    round with fewer accepted updates than ``min-clients`` (models unchanged).

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


def flower_round_metrics(report: TrainRound, scores: dict, *, lr: float, round_time_s: float,
                         wall_time_s: float) -> FlowerRoundMetrics:
    """The round's line from what the strategy saw (``report``) and the served model's ``scores``."""
    accepted = [o.metrics for o in report.outcomes if o.status == ACCEPTED]
    return round_metrics(
        report.round, report.stats, kind=FlowerRoundMetrics,
        clients=sorted(o.client for o in report.outcomes if o.status == ACCEPTED),
        failed_clients=[o.node for o in report.outcomes if o.status in (ERROR, MISSING)],
        updates=[(float(m["train-loss"]), int(m["num-examples"])) for m in accepted], scores=scores,
        sent=len(report.sent), bytes_down_per_client=report.bytes_down_per_client, lr=lr,
        round_time_s=round_time_s, wall_time_s=wall_time_s, rejected=report.count(REJECTED),
        rejected_reasons=[f"node {o.node}: {o.reason}" for o in report.outcomes if o.status != ACCEPTED],
        errors=report.count(ERROR), missing=report.count(MISSING), nodes=list(report.sent),
        state_restored=sum(int(m["state-restored"]) for m in accepted),
    )
