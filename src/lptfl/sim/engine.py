"""The simulator: many clients, one model object per process, rounds driven from one process.

Data live as tensors once (a client is a slice of them); one local trainer trains every sampled
client in turn (:class:`~lptfl.sim.client_side.ClientSide`), in this process or shared out among
worker processes (:mod:`lptfl.sim.workers`); payloads are really encoded and decoded in both
directions and their lengths are what the metrics report; the server sums updates in float64 in
the sampled order. Randomness is derived from ``(seed, round, client)``, so a round's result does
not depend on what ran before it, nor on which process trained which client.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping
from pathlib import Path

import torch

from lptfl.experiment.assembly import RunAssembly
from lptfl.experiment.config import RunConfig
from lptfl.experiment.evaluation import is_evaluated, not_evaluated
from lptfl.experiment.results import RoundMetrics
from lptfl.experiment.round_metrics import round_metrics
from lptfl.experiment.run_dir import CLIENT_STATE
from lptfl.experiment.setup import client_fails, learning_rate, run_steps, sample_clients
from lptfl.fl import ClientStateStore
from lptfl.fl.client_algorithm import ClientAlgorithm
from lptfl.fl.server_algorithm import ServerAlgorithm
from lptfl.sim.client_side import ClientJob, ClientReply, ClientSide, RoundJob
from lptfl.sim.workers import start_workers

log = logging.getLogger(__name__)

_MEMORY_STATE_LIMIT = 2 << 30  # bytes of client optimizer state kept in memory under client_state="auto"


class RunAlgorithm:
    """Both sides of the run's FL algorithm in one process; its state is what a checkpoint keeps."""

    def __init__(self, client: ClientAlgorithm, server: ServerAlgorithm) -> None:
        self.client, self.server = client, server

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {**self.server.state_dict(), **self.client.state_dict()}

    def load_state_dict(self, tensors: Mapping[str, torch.Tensor]) -> None:
        self.client.load_state_dict(tensors)
        self.server.load_state_dict(tensors)


class Simulation(RunAssembly):
    """A run of ``config`` in this process: the assembled run (:class:`RunAssembly`), the clients'
    side (:class:`ClientSide`, here and in any worker processes), every client's optimizer state, and
    :meth:`run_round` until done. :meth:`close` (or leaving a ``with`` block) stops the workers.

    Args:
        config: the run's settings (validated here).
        out_dir: where client state may spill (``client_state="disk"``); None keeps memory.
    """

    def __init__(self, config: RunConfig, out_dir: Path | None = None) -> None:
        super().__init__(config)
        self.clients = ClientSide.of(self)
        self.server, server_algorithm = self.new_server()
        self.algorithm = RunAlgorithm(self.clients.algorithm, server_algorithm)
        self.store = self._client_store(out_dir)
        self.wall_time_s = 0.0
        self.workers = start_workers(config, run_steps(config, [len(p) for p in self.parts]))

    def __enter__(self) -> "Simulation":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        """Stop the worker processes (if any); the simulation runs no more rounds."""
        if self.workers is not None:
            self.workers.close()
            self.workers = None

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

    def train(self, job: RoundJob) -> list[ClientReply]:
        """The replies of ``job``'s clients (in its order), trained here or across the workers."""
        if self.workers is None:
            return self.clients.train(job)
        return self.workers.train(job, self.clients.steps, self.clients.train)

    def _score(self, served: Mapping[str, torch.Tensor]) -> dict[str, float]:
        """The served model's test metrics, scored here or across the workers."""
        if self.workers is None or self.scorer.batches < self.workers.size:
            return self.scorer.score(served)
        return self.scorer.combine(self.workers.score_sums(served, self.scorer.batches, self.scorer.sums))

    def run_round(self) -> RoundMetrics:
        """Run the next round and return its metrics."""
        cfg, client_side, server_side = self.config, self.algorithm.client, self.algorithm.server
        started = time.perf_counter()
        round_index = self.server.round + 1
        clients = sample_clients(cfg.num_clients, cfg.frac, cfg.seed, round_index)
        lr = learning_rate(cfg.lr, cfg.lr_schedule, round_index, cfg.c_rounds)
        down = self.server.downlink()
        server_side.begin_round()
        generator = server_side.generator_payload(self.policy.downlink)
        fedgen = server_side.fedgen_round(round_index) if generator is not None else None
        self.server.begin_round()
        failed = [c for c in clients if client_fails(cfg.seed, round_index, c, cfg.dropout)]
        replying = [c for c in clients if c not in failed]  # the failed received the model, never replied
        job = RoundJob(round_index, lr, down, generator, fedgen, [
            ClientJob(c, None if self.store is None else self.store.arrays(c), client_side.client_state(c))
            for c in replying])
        phase = {"train": 0.0, "codec": 0.0, "eval": 0.0}
        replies = self.train(job)
        phase["train"] = time.perf_counter() - started
        mark = time.perf_counter()
        accepted = []
        for reply in replies:
            if self.store is not None and reply.optimizer is not None:
                self.store.save_arrays(reply.client, reply.optimizer)
            client_side.load_client_state(reply.client, reply.local)
            if reply.label_counts is not None:
                server_side.report_counts(reply.client, reply.label_counts)
            if reply.payload is None:
                self.server.reject(reply.client, reply.error)
            elif self.server.receive(reply.payload, reply.num_samples, reply.client):
                accepted.append((reply.loss, reply.num_samples))
        self.server.end_round()
        server_side.end_round()
        phase["codec"] = time.perf_counter() - mark
        mark = time.perf_counter()
        served, evaluated = self.server.served_state(), is_evaluated(cfg, round_index)
        scores = self._score(served) if evaluated else not_evaluated()
        vote = self.scorer.vote_accuracy(client_side.local_states(served, replying)) if evaluated else None
        phase["eval"] = time.perf_counter() - mark
        elapsed = time.perf_counter() - started
        self.wall_time_s += elapsed
        return round_metrics(
            round_index, self.server.stats, clients=clients, failed_clients=failed, updates=accepted, scores=scores,
            sent=len(clients), bytes_down_per_client=len(down) + (0 if generator is None else len(generator)),
            lr=lr, round_time_s=elapsed, wall_time_s=self.wall_time_s, vote_accuracy=vote, phase_s=phase,
        )
