"""The clients' side of a simulated round: train the clients a :class:`RoundJob` names and encode
their uplinks, in the simulator's process and in each worker process alike (:mod:`lptfl.sim.workers`).

A job carries everything a client keeps between rounds (its optimizer state, FedBN's batch norm),
and a reply brings it back, so the process that trains a client holds nothing of it before or after:
the simulator's process keeps every client's state and any process can train any client.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from dataclasses import dataclass, field

import torch

from lptfl import codec
from lptfl.experiment.assembly import RunAssembly
from lptfl.fl import ClientStateStore, LocalTrainer, TrainResult
from lptfl.fl.client_algorithm import ClientAlgorithm, State
from lptfl.fl.client_state import OptimizerArrays
from lptfl.fl.cohort import CohortClient, CohortTrainer, cohort_unsupported
from lptfl.fl.seeds import derive_seed

log = logging.getLogger(__name__)


@dataclass
class ClientJob:
    """One client of a round, with what it kept from its earlier rounds.

    Attributes:
        client: its index.
        optimizer: its stored optimizer state (None: a fresh one).
        local: its own state entries (FedBN's batch norm; None: the model's initial ones).
    """

    client: int
    optimizer: OptimizerArrays | None = None
    local: State | None = None


@dataclass
class RoundJob:
    """The clients' work of one round.

    Attributes:
        round_index: the round (1-based); with the client it seeds each client's data order and rounding.
        lr: the round's learning rate.
        downlink: the encoded served model.
        generator: FedGen's encoded generator (None for the other algorithms).
        fedgen: FedGen's ``(alpha, beta, labels)`` of the round (None for the other algorithms).
        clients: the clients to train, in the order their replies are expected.
    """

    round_index: int
    lr: float
    downlink: bytes
    generator: bytes | None = None
    fedgen: tuple[float, float, list[int]] | None = None
    clients: list[ClientJob] = field(default_factory=list)


@dataclass
class ClientReply:
    """What one client sends back, and what it keeps for its next round.

    Attributes:
        client: its index.
        payload: its encoded update (the uplink); None when it has none to send (``error`` says why).
        num_samples: its training samples.
        loss: its mean training loss over the round (nats).
        label_counts: its samples per class where the server needs them (FedGen, FedFTG), else None.
        optimizer: its optimizer state after the round (None where no state is kept).
        local: its own state entries after the round (FedBN), else None.
        error: why ``payload`` is None (its training diverged: it keeps the state it came with).
    """

    client: int
    payload: bytes | None
    num_samples: int
    loss: float
    label_counts: torch.Tensor | None = None
    optimizer: OptimizerArrays | None = None
    local: State | None = None
    error: str | None = None


class ClientSide:
    """Trains any client of the run: one local trainer for all, one at a time or as a batched cohort.

    Args:
        run: the assembled run (data, partition, model, policy, compile plan).
        algorithm: the client side of the run's FL algorithm.
        keep_optimizer: whether clients keep their optimizer state between rounds (``--client_state``
            other than ``none``).
    """

    def __init__(self, run: RunAssembly, algorithm: ClientAlgorithm, *, keep_optimizer: bool) -> None:
        cfg = run.config
        self.config, self.policy, self.algorithm, self.keep_optimizer = cfg, run.policy, algorithm, keep_optimizer
        self.client_x, self.client_y = zip(*map(run.client_data, range(cfg.num_clients)))
        self.trainer = LocalTrainer(
            run.model, run.policy, optimizer=cfg.optimizer, lr=cfg.lr, example_input=run.data.train_x[: cfg.batch_size],
            compile=run.plan.train, compile_mode=cfg.compile_mode, device=run.device,
        )
        self.uplink_full_precision = [k for k in run.full_precision if k not in algorithm.local_names]
        self.cohort = self._cohort_trainer(run.device)
        # clients per batched step under --cohort_size 0: all of a round's until a step runs out of
        # memory, then halved until one fits (kept for the rest of the run)
        self._fitting: int | None = None

    @classmethod
    def of(cls, run: RunAssembly) -> "ClientSide":
        """The clients' side of ``run``, with a fresh client side of its FL algorithm."""
        return cls(run, run.client_algorithm(run.model), keep_optimizer=run.config.client_state != "none")

    def _cohort_trainer(self, device: torch.device) -> CohortTrainer | None:
        """The batched-cohort trainer when ``--cohort`` asks for one and the run allows it (else None;
        the reason is logged)."""
        mode = self.config.cohort
        if mode == "off" or (mode == "auto" and device.type != "cuda"):
            log.info("clients train one at a time (--cohort %s on %s)", mode, device.type)
            return None
        why = cohort_unsupported(self.trainer, objective=self.algorithm.objective)
        if why is not None:
            log.warning("--cohort %s: clients train one at a time: %s", mode, why)
            return None
        size = self.config.cohort_size
        log.info("clients train as one batched model, %s per step (--cohort %s)",
                 f"{size} clients" if size else "all of a round's clients (halved while a step runs out of memory)",
                 mode)
        return CohortTrainer(self.trainer, compile=self.trainer.compiled, compile_mode=self.config.compile_mode)

    def steps(self, client: int) -> int:
        """Local steps of ``client`` in a round (its share of a round's work)."""
        batches = -(-int(self.client_y[client].shape[0]) // self.config.batch_size)
        return self.config.epochs * batches

    def train(self, job: RoundJob) -> list[ClientReply]:
        """Train the clients of ``job`` from its downlink; one reply per client, in the job's order."""
        cfg, algorithm = self.config, self.algorithm
        self.trainer.set_lr(job.lr)
        start_state = codec.decode(job.downlink)
        if job.generator is not None:  # FedGen: the clients use the generator they decoded
            algorithm.begin_round(job.generator, *job.fedgen)
        regularizer = algorithm.regularizer(self.trainer.model, start_state)
        store = ClientStateStore() if self.keep_optimizer else None
        for entry in job.clients:
            algorithm.load_client_state(entry.client, entry.local)
            if store is not None and entry.optimizer is not None:
                store.save_arrays(entry.client, entry.optimizer)
        entries = {entry.client: entry for entry in job.clients}
        replies = []
        for client, result in self._updates(list(entries), start_state, regularizer, job, store):
            diverged = result.diverged_entry()
            if diverged is not None:  # the wire carries finite values only: no update, the round leaves it as it was
                entry = entries[client]
                replies.append(ClientReply(
                    client, None, result.num_samples, result.loss, algorithm.label_counts(self.client_y[client]),
                    entry.optimizer, entry.local,
                    error=f"its training diverged in round {job.round_index} ({diverged!r} holds NaN or infinite "
                          f"values; a lower --lr than {cfg.lr:g} may help)"))
                continue
            up = codec.encode(algorithm.uplink(client, result.state), self.policy.uplink,
                              full_precision=self.uplink_full_precision, compress=cfg.compress)
            replies.append(ClientReply(
                client, up, result.num_samples, result.loss, algorithm.label_counts(self.client_y[client]),
                None if store is None else store.arrays(client), algorithm.client_state(client)))
        return replies

    def _updates(self, clients: list[int], start_state: State, regularizer, job: RoundJob,
                 store: ClientStateStore | None) -> Iterator[tuple[int, TrainResult]]:
        """``(client, its update)`` for each of ``clients`` in order: a batched cohort at a time where
        the run has a cohort trainer, else one after another; ``store`` holds their optimizer states."""
        cfg, algorithm = self.config, self.algorithm

        def generator(client: int) -> torch.Generator:
            return torch.Generator().manual_seed(derive_seed(cfg.seed, job.round_index, client))

        if self.cohort is None:
            for client in clients:
                if store is not None:
                    store.load(client, self.trainer.inner)
                else:
                    self.trainer.inner.state.clear()
                result: TrainResult = self.trainer.train(
                    algorithm.start(client, start_state), self.client_x[client], self.client_y[client],
                    epochs=cfg.epochs, batch_size=cfg.batch_size, generator=generator(client),
                    regularizer=regularizer, objective=algorithm.objective,
                )
                if store is not None:
                    store.save(client, self.trainer.inner)
                yield client, result
            return
        first = 0
        while first < len(clients):
            chunk = clients[first : first + (self.config.cohort_size or self._fitting or len(clients))]
            members = [CohortClient(algorithm.start(c, start_state), self.client_x[c], self.client_y[c],
                                    generator(c), None if store is None else store.arrays(c))
                       for c in chunk]
            try:
                results = self.cohort.train(members, epochs=cfg.epochs, batch_size=cfg.batch_size, lr=job.lr,
                                            prox_mu=0.0 if regularizer is None else regularizer.mu)
            except torch.OutOfMemoryError:
                if self.config.cohort_size or len(chunk) == 1:
                    raise
                del members
                self._fitting = len(chunk) // 2
                if torch.cuda.is_available():
                    torch.cuda.empty_cache()
                log.warning("a batched step of %d clients ran out of memory; %d clients per step from now on",
                            len(chunk), self._fitting)
                continue  # the chunk again, smaller, from fresh generators: its rounds are as if never tried
            for client, done in zip(chunk, results):
                if store is not None and done.optimizer_state is not None:
                    store.save_arrays(client, done.optimizer_state)
                yield client, done.result
            first += len(chunk)
