"""One line of ``metrics.jsonl`` from what a driver saw in a round (both drivers build it here)."""

from __future__ import annotations

from collections.abc import Iterable, Mapping

from lptfl.experiment.results import RoundMetrics
from lptfl.fl.server import RoundStats


def round_metrics(round_index: int, stats: RoundStats, *, clients: list[int], failed_clients: list[int],
                  updates: Iterable[tuple[float, int]], scores: Mapping[str, float | None], sent: int,
                  bytes_down_per_client: int, lr: float, round_time_s: float, wall_time_s: float,
                  kind: type[RoundMetrics] = RoundMetrics, **fields) -> RoundMetrics:
    """The round's :class:`RoundMetrics` (or subclass ``kind``).

    Args:
        stats: the aggregation server's view of the round (bytes of each update it read, rejections).
        clients: the driver's clients of the round; failed_clients: those that never replied.
        updates: ``(mean train loss, samples)`` of each accepted update; ``train_loss`` is their
            sample-weighted mean.
        scores: the served model's test metrics (:class:`~lptfl.experiment.evaluation.ServedModelScorer`).
        sent: clients sent the model, ``bytes_down_per_client`` bytes each.
        fields: the driver's own fields, or its own view of a common one.
    """
    updates = list(updates)
    samples = sum(n for _, n in updates)
    values = dict(
        round=round_index, train_loss=sum(loss * n for loss, n in updates) / max(samples, 1),
        bytes_up=sum(stats.bytes_up), bytes_down=bytes_down_per_client * sent, bytes_up_per_client=list(stats.bytes_up),
        bytes_down_per_client=bytes_down_per_client, clients=clients, accepted=stats.accepted,
        rejected=stats.rejected, rejected_reasons=list(stats.reasons), rejected_norm=stats.rejected_norm,
        skipped=stats.skipped, failed=len(failed_clients), failed_clients=failed_clients, lr=lr,
        round_time_s=round_time_s, wall_time_s=wall_time_s, **scores,
    )
    return kind(**{**values, **fields})
