"""The Flower ``ServerApp``: LPT-FL rounds over a Flower federation.

The rounds are :class:`~lptfl.flower.LowPrecisionFedAvg`'s, driven by Flower's own
``Strategy.start``, in the run's set-up (:class:`lptfl.flower.run_strategy.RunStrategy`); the run
itself is assembled as the simulator's (:class:`lptfl.experiment.assembly.RunAssembly`: model,
ABAvg's validation split, the server with its FL algorithm, central evaluation with both scores)
and recorded in the same files (:mod:`lptfl.experiment.results`). Byte counts are the lengths of
the payloads that were actually sent and received.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

from flwr.app import ArrayRecord, Context, MetricRecord
from flwr.serverapp import Grid, ServerApp

from lptfl.experiment.assembly import RunAssembly
from lptfl.experiment.checkpoint import check_resumable, load_checkpoint, save_checkpoint, write_config
from lptfl.experiment.config import RunConfig
from lptfl.experiment.evaluation import is_evaluated, not_evaluated
from lptfl.experiment.results import METRICS, read_metrics, summarize
from lptfl.experiment.run_dir import RunDirectory
from lptfl.fl import Server
from lptfl.fl.server_algorithm import ServerAlgorithm
from lptfl.flower.config import FlowerOptions, from_flower_config
from lptfl.flower.metrics import flower_round_metrics
from lptfl.flower.partitions import discover_partitions, wait_for_nodes
from lptfl.flower.run_strategy import RunStrategy

log = logging.getLogger(__name__)

app = ServerApp()


class FlowerRun(RunAssembly):
    """The ServerApp's run: the assembled run (:class:`RunAssembly`), its strategy and its output."""

    def __init__(self, config: RunConfig, options: FlowerOptions) -> None:
        super().__init__(config)
        self.options = options
        self.strategy = RunStrategy(self)
        self.out_dir = Path(options.out_dir) if options.out_dir else None
        self.wall_time_s = 0.0
        self._round_started = 0.0
        self._lines = 0  # metrics.jsonl lines written (a checkpoint records them)

    @property
    def server(self) -> Server | None:
        """The aggregation server (None before round 1)."""
        return self.strategy.server

    @property
    def algorithm(self) -> ServerAlgorithm | None:
        """The server side of the run's FL algorithm (None before round 1)."""
        return self.strategy.algorithm

    store = None  # the clients' optimizer state stays on their nodes (Context.state)

    def resume_clock(self, wall_time_s: float) -> None:
        """Go on counting the run's wall time from a checkpoint's."""
        self.wall_time_s = wall_time_s

    def run(self, grid: Grid) -> dict | None:
        """Assign the partitions, run the rounds up to ``c_rounds`` (continuing from ``out_dir``'s
        checkpoint when it holds an unfinished run of these settings); the summary (None without
        ``out_dir``)."""
        if self.out_dir is None:
            self._run_rounds(grid)
            return None
        run = RunDirectory(self.out_dir)
        with run.locked():
            self._prepare(run)
            self._run_rounds(grid)
            summary = summarize(self.config, read_metrics(self.out_dir), wall_time_s=self.wall_time_s)
            summary["driver"] = "flower"
            run.write_summary(summary)
        return summary

    def _prepare(self, run: RunDirectory) -> None:
        """Resume from the folder's checkpoint of an unfinished run of these settings; else start anew,
        replacing the results of an earlier run there."""
        cfg = self.config
        checkpoint = load_checkpoint(run.path)
        if checkpoint is not None and checkpoint.fingerprint == cfg.fingerprint() and checkpoint.round < cfg.c_rounds:
            check_resumable(run.path, checkpoint, cfg)
            self.strategy.resume(checkpoint.state["server"], checkpoint.state["algorithm"])
            self.resume_clock(checkpoint.wall_time_s)
            run.truncate_metrics(checkpoint.metrics_lines)
            run.remove_results()
            self._lines = checkpoint.metrics_lines
            log.info("resuming %s after round %d", run.path, checkpoint.round)
        else:
            if (run.path / METRICS).exists():
                log.warning("replacing the earlier run in %s", run.path)
            run.prepare(overwrite=True)
        write_config(run.path, cfg)

    def _run_rounds(self, grid: Grid) -> None:
        options = self.options
        timeout = options.round_timeout or None
        nodes = wait_for_nodes(grid, options.min_nodes, options.wait_nodes_timeout)
        self.strategy.assign(discover_partitions(grid, nodes, timeout=timeout,
                                                 max_partitions=int(self.data.train_y.shape[0])))
        self.strategy.start(grid=grid, initial_arrays=ArrayRecord(self.initial),
                            num_rounds=self.config.c_rounds - self.strategy.rounds_done, timeout=timeout,
                            evaluate_fn=self.end_round)

    def end_round(self, server_round: int, arrays: ArrayRecord) -> MetricRecord | None:
        """``evaluate_fn`` of the strategy: score the served model, record the round."""
        if server_round == 0:  # before round 1: nothing to record
            self._round_started = time.perf_counter()
            return None
        server_round += self.strategy.rounds_done
        cfg, report = self.config, self.strategy.last_round
        scores = self.scorer.score(self.server.served_state()) if is_evaluated(cfg, server_round) else not_evaluated()
        elapsed = time.perf_counter() - self._round_started
        self.wall_time_s += elapsed
        metrics = flower_round_metrics(report, scores, lr=self.strategy.learning_rate(server_round),
                                       round_time_s=elapsed, wall_time_s=self.wall_time_s)
        log.info("round %d: accuracy %s, %d/%d updates accepted%s, %.1f s", server_round,
                 "not evaluated" if scores["test_accuracy"] is None else f"{scores['test_accuracy']:.4f}",
                 metrics.accepted, len(report.sent), " (skipped)" if metrics.skipped else "", elapsed)
        if self.out_dir is not None:
            RunDirectory(self.out_dir).append_metrics(metrics)
            self._lines += 1
            every = cfg.checkpoint_every
            if every and (server_round % every == 0 or server_round == cfg.c_rounds):
                save_checkpoint(self.out_dir, self, metrics_lines=self._lines)
        self._round_started = time.perf_counter()
        return MetricRecord({k: v for k, v in scores.items() if isinstance(v, (int, float))})


@app.main()
def main(grid: Grid, context: Context) -> None:
    """Entry point of the ServerApp (component ``lptfl.flower.server_app:app``)."""
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    config, options = from_flower_config(dict(context.run_config))
    config.warn_unused()
    FlowerRun(config, options).run(grid)
