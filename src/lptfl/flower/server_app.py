"""The Flower ``ServerApp``: LPT-FL rounds over a Flower federation.

The same objects as the in-process simulator (:mod:`lptfl.experiment.setup`): the model and its
initialisation (``build_run_model``), the precision policy (``RunConfig.policy()``), the
aggregation server (:class:`lptfl.fl.Server`), client sampling (``sample_clients``, over the
SuperNodes' partition ids), the learning-rate schedule, the FL algorithm's server side
(:class:`lptfl.fl.server_algorithm.ServerAlgorithm`), central evaluation with both scores
(:class:`lptfl.experiment.evaluation.ServedModelScorer`)
and the result files (:mod:`lptfl.experiment.results`). Byte counts are the lengths of the payloads
that were actually sent and received.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

import torch
from flwr.app import Context, Message, RecordDict
from flwr.serverapp import Grid, ServerApp

from lptfl.data import load_dataset
from lptfl.experiment.config import RunConfig
from lptfl.experiment.evaluation import ServedModelScorer, is_evaluated, not_evaluated
from lptfl.experiment.results import (
    METRICS,
    SUMMARY,
    append_metrics,
    read_metrics,
    summarize,
    write_summary,
)
from lptfl.experiment.setup import (
    build_run_model,
    derive_seed,
    learning_rate,
    sample_clients,
    split_clients,
    validation_data,
)
from lptfl.fl import Server, full_precision_names
from lptfl.fl.algorithms import accuracy_scorer
from lptfl.fl.server_algorithm import ServerAlgorithm
from lptfl.flower.config import FlowerOptions, from_flower_config
from lptfl.flower.metrics import FlowerRoundMetrics
from lptfl.flower.strategy import METRICS_RECORD, QUERY, RoundDriver, exchange

log = logging.getLogger(__name__)

app = ServerApp()


def wait_for_nodes(grid: Grid, count: int, timeout: float) -> list[int]:
    """Node ids once at least ``count`` SuperNodes are connected (RuntimeError after ``timeout`` s)."""
    deadline = time.monotonic() + timeout if timeout else None
    while True:
        nodes = sorted(int(n) for n in grid.get_node_ids())
        if len(nodes) >= count:
            return nodes
        if deadline is not None and time.monotonic() > deadline:
            raise RuntimeError(f"only {len(nodes)} of {count} SuperNodes connected after {timeout:.0f} s")
        time.sleep(0.5)


def discover_partitions(grid: Grid, nodes: list[int], timeout: float | None) -> tuple[dict[int, int], int]:
    """Ask each node for its ``partition-id``: ``({partition: node}, num_partitions)``."""
    messages = [Message(content=RecordDict(), dst_node_id=n, message_type=QUERY) for n in nodes]
    replies = exchange(grid, messages, timeout=timeout)
    mapping: dict[int, int] = {}
    num_partitions = 0
    for m in messages:
        reply = replies.get(m.metadata.message_id)
        if reply is None or reply.has_error():
            log.warning("node %s did not report its partition; it will not be sampled", m.metadata.dst_node_id)
            continue
        metrics = reply.content.metric_records[METRICS_RECORD]
        mapping[int(metrics["partition-id"])] = m.metadata.dst_node_id
        num_partitions = max(num_partitions, int(metrics["num-partitions"]))
    return mapping, num_partitions


class FlowerRun:
    """Everything the ServerApp holds for one run (model, server, evaluation set, output)."""

    def __init__(self, config: RunConfig, options: FlowerOptions) -> None:
        self.config, self.options = config, options
        self.data = load_dataset(config.dataset, config.data_path, download=config.download)
        model = build_run_model(config, self.data)
        initial = {k: v.clone() for k, v in model.state_dict().items()}
        self.full_precision = full_precision_names(model)
        self.device = torch.device(config.device)
        self.scorer = ServedModelScorer(config, self.data, self.device)
        self.eval_model = self.scorer.model  # the model that scores test_accuracy also serves ABAvg's scorer
        self.server = Server(initial, config.server_config(), full_precision=self.full_precision)
        _, val = split_clients(config, self.data.train_y.numpy())
        val_x, val_y = validation_data(config, self.data, val)
        scorer = None
        if val_x is not None:
            scorer = accuracy_scorer(self.eval_model, val_x, val_y, batch_size=config.test_batch_size)
        self.algorithm = ServerAlgorithm(
            config, self.server, self.eval_model, num_classes=self.data.num_classes,
            input_shape=self.data.input_shape,
            make_fp32_model=lambda: build_run_model(config, self.data).to(self.device),
            seed_for=lambda *parts: derive_seed(config.seed, *parts), scorer=scorer)
        self.driver = RoundDriver(self.server, round_timeout=options.round_timeout, algorithm=self.algorithm,
                                  num_classes=self.data.num_classes)
        self.out_dir = Path(options.out_dir) if options.out_dir else None
        self.wall_time_s = 0.0

    def run(self, grid: Grid) -> dict | None:
        cfg, options = self.config, self.options
        if self.out_dir is not None:
            self.out_dir.mkdir(parents=True, exist_ok=True)
            for name in (METRICS, SUMMARY):
                if (self.out_dir / name).exists():
                    log.warning("replacing %s from an earlier run", self.out_dir / name)
                    (self.out_dir / name).unlink()
        nodes = wait_for_nodes(grid, options.min_nodes, options.wait_nodes_timeout)
        partitions: dict[int, int] | None = None
        if cfg.frac < 1.0:  # sample partitions exactly as the simulator samples clients
            partitions, num_partitions = discover_partitions(grid, nodes, options.round_timeout or None)
        for round_index in range(1, cfg.c_rounds + 1):
            started = time.perf_counter()
            if partitions is None:
                picked = sorted(int(n) for n in grid.get_node_ids())
            else:
                wanted = sample_clients(num_partitions, cfg.frac, cfg.seed, round_index)
                picked = [partitions[p] for p in wanted if p in partitions]
            lr = learning_rate(cfg.lr, cfg.lr_schedule, round_index, cfg.c_rounds)
            outcome = self.driver.run_round(grid, picked, round_index, lr)
            scores = (self.scorer.score(self.server.served_state()) if is_evaluated(cfg, round_index)
                      else not_evaluated())
            elapsed = time.perf_counter() - started
            self.wall_time_s += elapsed
            metrics = FlowerRoundMetrics(
                round=round_index, train_loss=outcome.train_loss, **scores,
                bytes_up=sum(outcome.bytes_up), bytes_down=outcome.bytes_down_per_client * outcome.sent,
                bytes_up_per_client=outcome.bytes_up, bytes_down_per_client=outcome.bytes_down_per_client,
                clients=outcome.clients, accepted=outcome.accepted, rejected=outcome.rejected, lr=lr,
                round_time_s=elapsed, wall_time_s=self.wall_time_s, rejected_reasons=outcome.reasons,
                failed=len(outcome.failed_nodes), failed_clients=outcome.failed_nodes,
                rejected_norm=outcome.rejected_norm, skipped=outcome.skipped,
                errors=outcome.errors, missing=outcome.missing, nodes=list(picked), state_restored=outcome.restored,
            )
            log.info(
                "round %d: accuracy %s, %d/%d updates accepted%s, %.1f s",
                round_index, "not evaluated" if scores["test_accuracy"] is None else f"{scores['test_accuracy']:.4f}",
                outcome.accepted, outcome.sent, " (skipped)" if outcome.skipped else "", elapsed,
            )
            if self.out_dir is not None:
                append_metrics(self.out_dir, metrics)
        if self.out_dir is None:
            return None
        summary = summarize(cfg, read_metrics(self.out_dir), wall_time_s=self.wall_time_s)
        summary["driver"] = "flower"
        write_summary(self.out_dir, summary)
        return summary


@app.main()
def main(grid: Grid, context: Context) -> None:
    """Entry point of the ServerApp (component ``lptfl.flower.server_app:app``)."""
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    config, options = from_flower_config(dict(context.run_config))
    FlowerRun(config, options).run(grid)
