"""The Flower ``ServerApp``: LPT-FL rounds over a Flower federation.

The rounds are :class:`~lptfl.flower.LowPrecisionFedAvg`'s, driven by Flower's own
``Strategy.start``, in the run's set-up (:class:`lptfl.flower.run_strategy.RunStrategy`);
the rest is what the in-process simulator uses (:mod:`lptfl.experiment.setup`): the model and
its initialisation (``build_run_model``), ABAvg's validation split, central evaluation with
both scores (:class:`lptfl.experiment.evaluation.ServedModelScorer`) and the result files
(:mod:`lptfl.experiment.results`). Byte counts are the lengths of the payloads that were
actually sent and received.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

import torch
from flwr.app import ArrayRecord, Context, MetricRecord
from flwr.serverapp import Grid, ServerApp

from lptfl.data import load_dataset
from lptfl.experiment.config import RunConfig
from lptfl.experiment.evaluation import ServedModelScorer, is_evaluated, not_evaluated
from lptfl.experiment.results import METRICS, SUMMARY, append_metrics, read_metrics, summarize, write_summary
from lptfl.experiment.setup import build_run_model, split_clients, validation_data
from lptfl.fl import Server
from lptfl.fl.algorithms import accuracy_scorer
from lptfl.flower.config import FlowerOptions, from_flower_config
from lptfl.flower.fedavg import ACCEPTED, ERROR, MISSING, REJECTED, TrainRound
from lptfl.flower.metrics import FlowerRoundMetrics
from lptfl.flower.partitions import discover_partitions, wait_for_nodes
from lptfl.flower.run_strategy import RunStrategy

log = logging.getLogger(__name__)

app = ServerApp()


def round_metrics(report: TrainRound, scores: dict, *, lr: float, round_time_s: float,
                  wall_time_s: float) -> FlowerRoundMetrics:
    """One line of ``metrics.jsonl`` from what the strategy saw in a round and its scores."""
    accepted = [o for o in report.outcomes if o.status == ACCEPTED]
    failed = [o for o in report.outcomes if o.status in (ERROR, MISSING)]
    samples = sum(int(o.metrics["num-examples"]) for o in accepted)
    loss = sum(float(o.metrics["train-loss"]) * int(o.metrics["num-examples"]) for o in accepted)
    return FlowerRoundMetrics(
        round=report.round, train_loss=loss / max(samples, 1), **scores,
        bytes_up=sum(report.stats.bytes_up), bytes_down=report.bytes_down_per_client * len(report.sent),
        bytes_up_per_client=list(report.stats.bytes_up), bytes_down_per_client=report.bytes_down_per_client,
        clients=sorted(o.client for o in accepted), accepted=len(accepted), rejected=report.count(REJECTED),
        lr=lr, round_time_s=round_time_s, wall_time_s=wall_time_s,
        rejected_reasons=[f"node {o.node}: {o.reason}" for o in report.outcomes if o.status != ACCEPTED],
        failed=len(failed), failed_clients=[o.node for o in failed], rejected_norm=report.stats.rejected_norm,
        skipped=not report.updated, errors=report.count(ERROR), missing=report.count(MISSING),
        nodes=list(report.sent),
        state_restored=sum(int(o.metrics["state-restored"]) for o in accepted),
    )


class FlowerRun:
    """Everything the ServerApp holds for one run (strategy, evaluation, output)."""

    def __init__(self, config: RunConfig, options: FlowerOptions) -> None:
        self.config, self.options = config, options
        self.data = load_dataset(config.dataset, config.data_path, download=config.download)
        model = build_run_model(config, self.data)
        self.initial = ArrayRecord({k: v.clone() for k, v in model.state_dict().items()})
        device = torch.device(config.device)
        self.scorer = ServedModelScorer(config, self.data, device)
        _, val = split_clients(config, self.data.train_y.numpy())
        val_x, val_y = validation_data(config, self.data, val)
        scorer = None
        if val_x is not None:  # the model that scores test_accuracy also serves ABAvg's scorer
            scorer = accuracy_scorer(self.scorer.model, val_x, val_y, batch_size=config.test_batch_size)
        self.strategy = RunStrategy(config, self.data, model=model, eval_model=self.scorer.model, scorer=scorer,
                                    make_fp32_model=lambda: build_run_model(config, self.data).to(device))
        self.out_dir = Path(options.out_dir) if options.out_dir else None
        self.wall_time_s = 0.0
        self._round_started = 0.0

    @property
    def server(self) -> Server | None:
        """The aggregation server (None before round 1)."""
        return self.strategy.server

    def run(self, grid: Grid) -> dict | None:
        """Assign the partitions, run ``c_rounds`` rounds; the summary (None without ``out_dir``)."""
        cfg, options = self.config, self.options
        if self.out_dir is not None:
            self.out_dir.mkdir(parents=True, exist_ok=True)
            for name in (METRICS, SUMMARY):
                if (self.out_dir / name).exists():
                    log.warning("replacing %s from an earlier run", self.out_dir / name)
                    (self.out_dir / name).unlink()
        timeout = options.round_timeout or None
        nodes = wait_for_nodes(grid, options.min_nodes, options.wait_nodes_timeout)
        self.strategy.assign(discover_partitions(grid, nodes, timeout=timeout,
                                                 max_partitions=int(self.data.train_y.shape[0])))
        self.strategy.start(grid=grid, initial_arrays=self.initial, num_rounds=cfg.c_rounds, timeout=timeout,
                            evaluate_fn=self.end_round)
        if self.out_dir is None:
            return None
        summary = summarize(cfg, read_metrics(self.out_dir), wall_time_s=self.wall_time_s)
        summary["driver"] = "flower"
        write_summary(self.out_dir, summary)
        return summary

    def end_round(self, server_round: int, arrays: ArrayRecord) -> MetricRecord | None:
        """``evaluate_fn`` of the strategy: score the served model, record the round."""
        if server_round == 0:  # before round 1: nothing to record
            self._round_started = time.perf_counter()
            return None
        cfg, report = self.config, self.strategy.last_round
        scores = (self.scorer.score(self.strategy.server.served_state()) if is_evaluated(cfg, server_round)
                  else not_evaluated())
        elapsed = time.perf_counter() - self._round_started
        self.wall_time_s += elapsed
        metrics = round_metrics(report, scores, lr=self.strategy.learning_rate(server_round), round_time_s=elapsed,
                                wall_time_s=self.wall_time_s)
        log.info("round %d: accuracy %s, %d/%d updates accepted%s, %.1f s", server_round,
                 "not evaluated" if scores["test_accuracy"] is None else f"{scores['test_accuracy']:.4f}",
                 metrics.accepted, len(report.sent), " (skipped)" if metrics.skipped else "", elapsed)
        if self.out_dir is not None:
            append_metrics(self.out_dir, metrics)
        self._round_started = time.perf_counter()
        return MetricRecord({k: v for k, v in scores.items() if isinstance(v, (int, float))})


@app.main()
def main(grid: Grid, context: Context) -> None:
    """Entry point of the ServerApp (component ``lptfl.flower.server_app:app``)."""
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    config, options = from_flower_config(dict(context.run_config))
    FlowerRun(config, options).run(grid)
