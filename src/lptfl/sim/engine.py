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
from collections.abc import Iterator, Mapping
from pathlib import Path

import torch

from lptfl import codec
from lptfl.experiment.assembly import RunAssembly
from lptfl.experiment.config import RunConfig
from lptfl.experiment.evaluation import is_evaluated, not_evaluated
from lptfl.experiment.results import RoundMetrics
from lptfl.experiment.round_metrics import round_metrics
from lptfl.experiment.run_dir import CLIENT_STATE
from lptfl.experiment.setup import client_fails, learning_rate, sample_clients
from lptfl.fl import ClientStateStore, LocalTrainer, TrainResult
from lptfl.fl.client_algorithm import ClientAlgorithm
from lptfl.fl.cohort import CohortClient, CohortTrainer, cohort_unsupported
from lptfl.fl.seeds import derive_seed
from lptfl.fl.server_algorithm import ServerAlgorithm

log = logging.getLogger(__name__)

_MEMORY_STATE_LIMIT = 2 << 30  # bytes of client optimizer state kept in memory under client_state="auto"


class RunAlgorithm:
    """Both sides of the run's FL algorithm in one process; its state is what a checkpoint keeps."""

    def __init__(self, client: ClientAlgorithm, server: ServerAlgorithm) -> None:
        self.client, self.server = client, server
        self.bank, self.fedgen, self.fedftg = client.bank, server.fedgen, server.fedftg

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {**self.server.state_dict(), **self.client.state_dict()}

    def load_state_dict(self, tensors: Mapping[str, torch.Tensor]) -> None:
        self.client.load_state_dict(tensors)
        self.server.load_state_dict(tensors)


class Simulation(RunAssembly):
    """A run of ``config`` in this process: the assembled run (:class:`RunAssembly`), one local
    trainer for every client, their optimizer-state store, and :meth:`run_round` until done.

    Args:
        config: the run's settings (validated here).
        out_dir: where client state may spill (``client_state="disk"``); None keeps memory.
    """

    def __init__(self, config: RunConfig, out_dir: Path | None = None) -> None:
        super().__init__(config)
        self.client_x, self.client_y = zip(*map(self.client_data, range(config.num_clients)))
        self.trainer = LocalTrainer(
            self.model, self.policy, optimizer=config.optimizer, lr=config.lr,
            example_input=self.data.train_x[: config.batch_size], compile=self.plan.train,
            compile_mode=config.compile_mode, device=self.device,
        )
        self.server, server_algorithm = self.new_server()
        self.algorithm = RunAlgorithm(self.client_algorithm(self.model), server_algorithm)
        self.uplink_full_precision = [k for k in self.full_precision if k not in self.algorithm.client.local_names]
        self.store = self._client_store(out_dir)
        self.cohort = self._cohort_trainer()
        self.wall_time_s = 0.0

    def _cohort_trainer(self) -> CohortTrainer | None:
        """The batched-cohort trainer when ``--cohort`` asks for one and the run allows it (else None;
        the reason is logged)."""
        mode = self.config.cohort
        if mode == "off" or (mode == "auto" and self.device.type != "cuda"):
            log.info("clients train one at a time (--cohort %s on %s)", mode, self.device.type)
            return None
        why = cohort_unsupported(self.trainer, objective=self.algorithm.client.objective)
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
        cfg, algorithm = self.config, self.algorithm.client

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
                    algorithm.start(client, start_state), self.client_x[client], self.client_y[client],
                    epochs=cfg.epochs, batch_size=cfg.batch_size, generator=generator(client),
                    regularizer=regularizer, objective=algorithm.objective,
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
            members = [CohortClient(algorithm.start(c, start_state), self.client_x[c], self.client_y[c],
                                    generator(c), None if self.store is None else self.store.arrays(c))
                       for c in chunk]
            results = self.cohort.train(members, epochs=cfg.epochs, batch_size=cfg.batch_size, lr=lr,
                                        prox_mu=0.0 if regularizer is None else regularizer.mu)
            if self.store is not None:
                for client, done in zip(chunk, results):
                    if done.optimizer_state is not None:
                        self.store.save_arrays(client, done.optimizer_state)
            phase["train"] += time.perf_counter() - mark
            yield from ((client, done.result) for client, done in zip(chunk, results))

    def _client_store(self, out_dir: Path | None) -> ClientStateStore | None:
        mode = self.config.client_state
        if mode == "none":
            return None
        params = sum(p.numel() for p in self.model.parameters())
        estimate = self.config.num_clients * params * 8
        if mode == "auto":
            mode = "memory" if estimate <= _MEMORY_STATE_LIMIT or out_dir is None else "disk"
        if mode == "disk":
            if out_dir is None:
                raise ValueError("--client_state disk needs an output directory")
            return ClientStateStore(Path(out_dir) / CLIENT_STATE)
        return ClientStateStore()

    @property
    def round(self) -> int:
        return self.server.round

    def resume_clock(self, wall_time_s: float) -> None:
        """Count the simulated wall time (seconds) on from a checkpoint's."""
        self.wall_time_s = wall_time_s

    def run_round(self) -> RoundMetrics:
        """Run the next round and return its metrics."""
        cfg, client_side, server_side = self.config, self.algorithm.client, self.algorithm.server
        started = time.perf_counter()
        round_index = self.server.round + 1
        clients = sample_clients(cfg.num_clients, cfg.frac, cfg.seed, round_index)
        lr = learning_rate(cfg.lr, cfg.lr_schedule, round_index, cfg.c_rounds)
        self.trainer.set_lr(lr)
        down = self.server.downlink()
        start_state = codec.decode(down)
        server_side.begin_round()
        generator = server_side.generator_payload(self.policy.downlink)
        if generator is not None:  # FedGen: the clients use the generator they decoded
            client_side.begin_round(generator, *server_side.fedgen_round(round_index))
        regularizer = client_side.regularizer(self.trainer.model, start_state)
        self.server.begin_round()
        failed = [c for c in clients if client_fails(cfg.seed, round_index, c, cfg.dropout)]
        replying = [c for c in clients if c not in failed]  # the failed received the model, never replied
        phase = {"train": 0.0, "codec": 0.0, "eval": 0.0}
        accepted = []
        for client, result in self._updates(replying, start_state, regularizer, round_index, lr, phase):
            mark = time.perf_counter()
            counts = client_side.label_counts(self.client_y[client])
            if counts is not None:
                server_side.report_counts(client, counts)
            up = codec.encode(client_side.uplink(client, result.state), self.policy.uplink,
                              full_precision=self.uplink_full_precision, compress=cfg.compress)
            if self.server.receive(up, result.num_samples, client):
                accepted.append((result.loss, result.num_samples))
            phase["codec"] += time.perf_counter() - mark
        self.server.end_round()
        server_side.end_round()
        mark = time.perf_counter()
        served, evaluated = self.server.served_state(), is_evaluated(cfg, round_index)
        scores = self.scorer.score(served) if evaluated else not_evaluated()
        vote = self.scorer.vote_accuracy(client_side.local_states(served, replying)) if evaluated else None
        phase["eval"] = time.perf_counter() - mark
        elapsed = time.perf_counter() - started
        self.wall_time_s += elapsed
        return round_metrics(
            round_index, self.server.stats, clients=clients, failed_clients=failed, updates=accepted, scores=scores,
            sent=len(clients), bytes_down_per_client=len(down) + (0 if generator is None else len(generator)),
            lr=lr, round_time_s=elapsed, wall_time_s=self.wall_time_s, vote_accuracy=vote, phase_s=phase,
        )
