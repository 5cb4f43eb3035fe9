"""The in-process simulator: many clients, one model object, rounds driven in one process.

Data live as tensors once (a client is a slice of them); one :class:`LocalTrainer` trains
every sampled client in turn; payloads are really encoded and decoded in both directions
and their lengths are what the metrics report; the server sums updates in float64 as they
arrive. Randomness is derived from ``(seed, round, client)``, so a round's result does not
depend on what ran before it in the process.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator
from pathlib import Path

import torch

from lptfl import codec
from lptfl.data import load_dataset, partition_summary
from lptfl.experiment.config import RunConfig
from lptfl.experiment.evaluation import ServedModelScorer, is_evaluated, not_evaluated
from lptfl.experiment.results import RoundMetrics
from lptfl.experiment.setup import (
    build_run_model,
    client_fails,
    compile_plan,
    derive_seed,
    learning_rate,
    sample_clients,
    split_clients,
    validation_data,
)
from lptfl.fl import (
    ClientStateStore,
    LocalTrainer,
    Server,
    TrainResult,
    full_precision_names,
)
from lptfl.fl.cohort import ADAM_STATE_NAMES, CohortClient, CohortTrainer, cohort_unsupported
from lptfl.sim.algorithm_hooks import AlgorithmHooks

log = logging.getLogger(__name__)

# Relative L2 difference allowed between the compiled and the eager evaluation logits (first batch).
# With 8-bit activations, rounding flips cascade: a 1e-6 relative input perturbation alone moves an
# untrained ConvNet's FMNIST logits by ~1.2%, and inductor's differ from eager by ~1.5% (same
# argmax for >99% of rows). A miscompiled forward differs by O(1). Failing the check costs a lot:
# eager 8-bit evaluation of 10k images takes 60-90 s against 16-25 s compiled on 2 CPU cores.
EVAL_TOLERANCE = 0.1
_MEMORY_STATE_LIMIT = 2 << 30  # bytes of client optimizer state kept in memory under client_state="auto"


class Simulation:
    """A run of ``config``: build everything, then :meth:`run_round` until done.

    Args:
        config: the run's settings (validated here).
        out_dir: where client state may spill (``client_state="disk"``); None keeps memory.
    """

    def __init__(self, config: RunConfig, out_dir: Path | None = None) -> None:
        config.validate()
        self.config = config
        self.device = torch.device(config.device)
        self.data = load_dataset(config.dataset, config.data_path, download=config.download,
                                 verify=not config.no_verify)
        labels = self.data.train_y.numpy()
        self.parts, val = split_clients(config, labels)  # no client trains on ABAvg's validation data
        self.val_x, self.val_y = validation_data(config, self.data, val)
        log.info("partition:\n%s", partition_summary(labels, self.parts, self.data.num_classes))
        self.client_x = [self.data.train_x[torch.from_numpy(p)] for p in self.parts]
        self.client_y = [self.data.train_y[torch.from_numpy(p)] for p in self.parts]
        self.policy = config.policy()
        plan = compile_plan(config, [len(p) for p in self.parts], len(self.data.test_y), self.device,
                            self.policy.is_full_precision)
        log.info("torch.compile: training step %s, evaluation %s (%s)", "on" if plan.train else "off",
                 "on" if plan.eval else "off", plan.reason)
        model = build_run_model(config, self.data)
        initial = {k: v.clone() for k, v in model.state_dict().items()}
        self.full_precision = full_precision_names(model)
        example = self.data.train_x[: config.batch_size]
        self.trainer = LocalTrainer(
            model, self.policy, optimizer=config.optimizer, lr=config.lr,
            example_input=example, compile=plan.train, compile_mode=config.compile_mode, device=self.device,
        )
        self.scorer = ServedModelScorer(config, self.data, self.device, compile=plan.eval, verify=EVAL_TOLERANCE)
        # the model that scores test_accuracy also serves ABAvg's scorer and FedBN's vote
        self.eval_model, self.eval_forward = self.scorer.model, self.scorer.forward
        self.server = Server(
            initial,
            config.server_config(),
            full_precision=self.full_precision,
        )
        self.store = self._client_store(out_dir, model)
        self.algorithm = AlgorithmHooks(self)
        self.cohort = self._cohort_trainer()
        self.wall_time_s = 0.0

    def _cohort_trainer(self) -> CohortTrainer | None:
        """The batched-cohort trainer when ``--cohort`` asks for one and the run allows it (else None;
        the reason is logged)."""
        mode = self.config.cohort
        if mode == "off" or (mode == "auto" and self.device.type != "cuda"):
            log.info("clients train one at a time (--cohort %s on %s)", mode, self.device.type)
            return None
        why = cohort_unsupported(self.trainer, objective=self.algorithm.objective)
        if why is not None:
            log.warning("--cohort %s: clients train one at a time: %s", mode, why)
            return None
        size = self.config.cohort_size or "all the round's"
        log.info("clients train as one batched model, %s clients per step (--cohort %s)", size, mode)
        return CohortTrainer(self.trainer, compile=self.trainer.compiled, compile_mode=self.config.compile_mode)

    def _updates(self, clients: list[int], start_state: dict[str, torch.Tensor], regularizer, round_index: int,
                 lr: float, phase: dict[str, float]) -> Iterator[tuple[int, TrainResult]]:
        """``(client, its update)`` for each of ``clients`` in order: a batched cohort at a time where
        the run has a cohort trainer, else one after another. Adds the training time to ``phase``."""
        cfg = self.config

        def generator(client: int) -> torch.Generator:
            return torch.Generator().manual_seed(derive_seed(cfg.seed, round_index, client))

        if self.cohort is None:
            for client in clients:
                mark = time.perf_counter()
                if self.store is not None:
                    self.store.load(client, self.trainer.inner)
                else:
                    self.trainer.inner.state.clear()
                result = self.trainer.train(
                    self.algorithm.client_start(client, start_state), self.client_x[client], self.client_y[client],
                    epochs=cfg.epochs, batch_size=cfg.batch_size, generator=generator(client),
                    regularizer=regularizer, objective=self.algorithm.objective,
                )
                if self.store is not None:
                    self.store.save(client, self.trainer.inner)
                phase["train"] += time.perf_counter() - mark
                yield client, result
            return
        size = cfg.cohort_size or max(len(clients), 1)
        for first in range(0, len(clients), size):
            mark = time.perf_counter()
            chunk = clients[first : first + size]
            members = [CohortClient(self.algorithm.client_start(c, start_state), self.client_x[c], self.client_y[c],
                                    generator(c), None if self.store is None else self.store.arrays(c))
                       for c in chunk]
            results = self.cohort.train(members, epochs=cfg.epochs, batch_size=cfg.batch_size, lr=lr,
                                        prox_mu=0.0 if regularizer is None else regularizer.mu)
            if self.store is not None:
                for client, done in zip(chunk, results):
                    if done.optimizer_state is not None:
                        self.store.save_arrays(client, ADAM_STATE_NAMES, *done.optimizer_state)
            phase["train"] += time.perf_counter() - mark
            yield from ((client, done.result) for client, done in zip(chunk, results))

    def _client_store(self, out_dir: Path | None, model: torch.nn.Module) -> ClientStateStore | None:
        mode = self.config.client_state
        if mode == "none":
            return None
        params = sum(p.numel() for p in model.parameters())
        estimate = self.config.num_clients * params * 8
        if mode == "auto":
            mode = "memory" if estimate <= _MEMORY_STATE_LIMIT or out_dir is None else "disk"
        if mode == "disk":
            if out_dir is None:
                raise ValueError("--client_state disk needs an output directory")
            return ClientStateStore(Path(out_dir) / "client_state")
        return ClientStateStore()

    def seed_for(self, *parts: int) -> int:
        """A seed derived from the run's seed and ``parts`` (e.g. a round and a tag)."""
        return derive_seed(self.config.seed, *parts)

    def make_fp32_model(self) -> torch.nn.Module:
        """A fresh full-precision model of the run's architecture (no quantizers), for server-side
        work such as FedFTG's fine-tuning."""
        return build_run_model(self.config, self.data).to(self.device)

    @property
    def round(self) -> int:
        return self.server.round

    def run_round(self) -> RoundMetrics:
        """Run the next round and return its metrics."""
        cfg = self.config
        started = time.perf_counter()
        round_index = self.server.round + 1
        clients = sample_clients(cfg.num_clients, cfg.frac, cfg.seed, round_index)
        lr = learning_rate(cfg.lr, cfg.lr_schedule, round_index, cfg.c_rounds)
        self.trainer.set_lr(lr)
        down = self.server.downlink()
        start_state = codec.decode(down)
        regularizer = self.algorithm.begin_round(start_state)
        self.server.begin_round()
        loss_sum, sample_sum = 0.0, 0
        failed = [c for c in clients if client_fails(cfg.seed, round_index, c, cfg.dropout)]
        phase = {"train": 0.0, "codec": 0.0, "eval": 0.0}
        replying = [c for c in clients if c not in failed]  # the failed received the model, never replied
        for client, result in self._updates(replying, start_state, regularizer, round_index, lr, phase):
            mark = time.perf_counter()
            up = codec.encode(self.algorithm.client_uplink(client, result.state), self.policy.uplink,
                              full_precision=self.algorithm.uplink_full_precision, compress=cfg.compress)
            self.server.receive(up, result.num_samples, client)
            phase["codec"] += time.perf_counter() - mark
            loss_sum += result.loss * result.num_samples
            sample_sum += result.num_samples
        self.server.end_round()
        self.algorithm.end_round()
        mark = time.perf_counter()
        evaluated = is_evaluated(cfg, round_index)
        scores = self.scorer.score(self.server.served_state()) if evaluated else not_evaluated()
        vote = self.algorithm.vote_accuracy() if evaluated else None
        phase["eval"] = time.perf_counter() - mark
        elapsed = time.perf_counter() - started
        self.wall_time_s += elapsed
        stats = self.server.stats
        return RoundMetrics(
            round=round_index,
            train_loss=loss_sum / max(sample_sum, 1),
            bytes_up=sum(stats.bytes_up),
            bytes_down=(len(down) + self.algorithm.extra_bytes_down) * len(clients),
            bytes_up_per_client=list(stats.bytes_up),
            bytes_down_per_client=len(down) + self.algorithm.extra_bytes_down,
            clients=clients,
            accepted=stats.accepted,
            rejected=stats.rejected,
            lr=lr,
            round_time_s=elapsed,
            wall_time_s=self.wall_time_s,
            rejected_reasons=list(stats.reasons),
            failed=len(failed),
            failed_clients=failed,
            rejected_norm=stats.rejected_norm,
            skipped=stats.skipped,
            vote_accuracy=vote,
            phase_s=phase,
            **scores,
        )
