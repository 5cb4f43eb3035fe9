"""Parallel workers: a round's clients trained by several processes over ``torch.distributed`` (gloo).

Rank 0 is the simulator's process: it keeps the server, every client's state and the run folder.
Each round it splits the round's clients among the ranks, balanced by local steps, sends each rank
its share with the clients' state (a scatter), trains its own share, and gathers the replies: the
encoded uplinks and the clients' new state. It then feeds the server in the sampled order, so the
aggregate is that of one process whatever the number of workers. The served model's evaluation is
split the same way, by test batches, and the sums are added on rank 0.

``lptfl run --workers N`` starts N - 1 worker processes on this machine (``python -m
lptfl.sim.workers``). Under ``torchrun`` every rank runs the ``lptfl run`` command; rank 0 runs the
experiment and the others serve as workers (:func:`serve`), whatever their flags.
"""

from __future__ import annotations

import logging
import os
import pickle
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist

from lptfl.experiment.config import RunConfig
from lptfl.sim.client_side import ClientReply, ClientSide, RoundJob

log = logging.getLogger(__name__)

# A collective waits this long for the other ranks: rank 0 checkpoints and evaluates between rounds,
# and a share of a round can take many minutes on a CPU; a rank that dies closes its sockets, which
# the others see at once.
_COLLECTIVE_TIMEOUT = timedelta(hours=12)
_START_TIMEOUT_S = 600.0  # for the ranks to meet (a worker imports torch; a rank waits for rank 0's store)
# --workers auto starts workers for runs of at least this many local steps: starting one (a Python
# process that imports torch and builds the run) costs seconds, a step tens of milliseconds
WORKERS_MIN_STEPS = 500
# --workers auto gives each process this many cores: one process uses a few threads well on a
# batch of 32, and on two cores a second process was no faster than a second thread (docs/workers.md)
THREADS_PER_WORKER = 4
_GROUP_PREFIX = "lptfl"  # the group's keys in the store, apart from a launcher's own


def launched_rank() -> tuple[int, int] | None:
    """``(rank, world size)`` when a launcher such as ``torchrun`` started this process as one of
    several (``RANK`` and ``WORLD_SIZE`` set, size above 1), else None."""
    if "RANK" not in os.environ or int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return None
    return int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])


def usable_cpus() -> int:
    """CPU cores this process may run on."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def worker_count(config: RunConfig, run_steps: int) -> tuple[int, str]:
    """``--workers``' choice for a run of ``run_steps`` local steps on this machine, and why."""
    if config.workers:
        return config.workers, f"--workers {config.workers}"
    if torch.device(config.device).type == "cuda":
        return 1, "--workers auto on CUDA: one process drives the GPU"
    per_round = config.clients_per_round()
    cores = usable_cpus()
    if run_steps < WORKERS_MIN_STEPS:
        return 1, f"--workers auto: ~{run_steps} local steps in the run, too few to repay starting workers " \
                  f"(from {WORKERS_MIN_STEPS})"
    count = max(1, min(cores // THREADS_PER_WORKER, per_round))
    return count, f"--workers auto: {cores} CPU cores, {THREADS_PER_WORKER} per process, {per_round} clients a round"


def start_workers(config: RunConfig, run_steps: int) -> "WorkerGroup | None":
    """The worker group of a run of ``run_steps`` local steps, or None where one process trains alone:
    the ranks of a launcher (``torchrun``), else ``--workers`` processes on this machine."""
    if launched_rank() is not None:
        return WorkerGroup.join(config)
    count, why = worker_count(config, run_steps)
    if count == 1:
        log.info("one process trains each round's clients (%s)", why)
        return None
    log.info("%d processes train each round's clients (%s)", count, why)
    return WorkerGroup.launch(config, count)


@dataclass
class WorkerFailure:
    """A worker's exception, sent to rank 0 instead of its reply."""

    rank: int
    error: str
    details: str


class WorkerGroup:
    """Rank 0's side of the group: sends shares, trains its own, gathers the replies.

    Build it with :meth:`launch` (worker processes on this machine) or :meth:`join` (ranks started by
    a launcher); :meth:`close` stops the workers.
    """

    def __init__(self, size: int, processes: list[subprocess.Popen] | None = None) -> None:
        self.size = size
        self._processes = processes or []
        self._threads = torch.get_num_threads()  # this process's, restored by close()
        self._channel: Channel | None = None
        self._exchanging = False  # shares sent, answers not all received: the workers are busy or sending
        self._logs: Path | None = None  # the worker processes' output; kept where a worker failed

    @classmethod
    def launch(cls, config: RunConfig, size: int) -> "WorkerGroup":
        """Start ``size - 1`` worker processes on this machine and form the group with them;
        every process, this one included, computes with ``OMP_NUM_THREADS`` threads where it is set,
        else ``usable_cpus() // size``."""
        threads = _env_threads() or max(1, usable_cpus() // size)
        port = _free_port()
        logs = Path(tempfile.mkdtemp(prefix="lptfl-workers-"))
        processes = []
        for rank in range(1, size):
            env = {**os.environ, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "RANK": str(rank),
                   "WORLD_SIZE": str(size), "LOCAL_RANK": str(rank), "OMP_NUM_THREADS": str(threads)}
            with open(logs / f"worker-{rank}.log", "wb") as out:
                processes.append(subprocess.Popen(
                    [sys.executable, "-m", "lptfl.sim.workers"], env=env, stdin=subprocess.DEVNULL, stdout=out,
                    stderr=subprocess.STDOUT, start_new_session=True))  # Ctrl-C reaches rank 0 only
        group = cls(size, processes)
        group._logs = logs
        torch.set_num_threads(threads)
        try:
            store = dist.TCPStore("127.0.0.1", port, size, is_master=True,
                                  timeout=timedelta(seconds=_START_TIMEOUT_S), wait_for_workers=False)
            group._wait_started(store, logs)
            group._form(store, config)
        except BaseException:
            group._logs = None  # the error names them
            group.close()
            raise
        log.info("%d worker process%s started, %d torch thread%s per process (logs in %s)", size - 1,
                 "es" if size > 2 else "", threads, "s" if threads > 1 else "", logs)
        return group

    @classmethod
    def join(cls, config: RunConfig) -> "WorkerGroup":
        """Form the group with the ranks a launcher started (``MASTER_ADDR``, ``MASTER_PORT``, ``RANK``
        and ``WORLD_SIZE`` set, as ``torchrun`` does)."""
        _, size = launched_rank()
        group = cls(size)
        group._form(_launcher_store(0, size), config)
        log.info("%d ranks train each round's clients", size)
        return group

    def _form(self, store: dist.Store, config: RunConfig) -> None:
        self._channel = Channel(store, 0, self.size)
        for rank in range(1, self.size):
            self._channel.send(config, rank)

    def _wait_started(self, store: dist.TCPStore, logs: Path) -> None:
        """Wait until every worker has said it is up, or raise when one has exited."""
        keys = [f"started/{rank}" for rank in range(1, self.size)]
        deadline = time.monotonic() + _START_TIMEOUT_S
        while not store.check(keys):
            for rank, proc in enumerate(self._processes, start=1):
                if proc.poll() is not None:
                    tail = (logs / f"worker-{rank}.log").read_text(errors="replace").strip().splitlines()[-1:]
                    raise RuntimeError(f"worker {rank} exited with {proc.returncode} while starting: "
                                       f"{tail[0] if tail else 'no output'} (log: {logs / f'worker-{rank}.log'})")
            if time.monotonic() > deadline:
                raise RuntimeError(f"the workers did not start within {_START_TIMEOUT_S:.0f} s (logs in {logs})")
            time.sleep(0.05)

    def train(self, job: RoundJob, cost: Callable[[int], int], local: Callable[[RoundJob], list[ClientReply]]
              ) -> list[ClientReply]:
        """Train ``job``'s clients across the group: ``cost(client)`` (local steps) balances the shares,
        ``local`` trains rank 0's. The replies come back in ``job``'s order."""
        shares = [[] for _ in range(self.size)]
        loads = [0] * self.size
        steps = {entry.client: cost(entry.client) for entry in job.clients}
        for entry in sorted(job.clients, key=lambda e: (-steps[e.client], e.client)):
            rank = min(range(self.size), key=lambda r: (loads[r], r))
            shares[rank].append(entry)
            loads[rank] += steps[entry.client]
        jobs = [replace(job, clients=share) for share in shares]
        answers = self._exchange([("train", share) for share in jobs], lambda: local(jobs[0]))
        by_client = {reply.client: reply for answer in answers for reply in answer}
        return [by_client[entry.client] for entry in job.clients]

    def score_sums(self, served: Mapping[str, torch.Tensor], batches: int,
                   local: Callable[[Mapping[str, torch.Tensor], range], dict]) -> list[dict]:
        """Each rank's sums of the served model's test scores over its share of the ``batches`` test
        batches (contiguous ranges); ``local`` scores rank 0's."""
        served = {k: v.detach().cpu() for k, v in served.items()}
        bounds = [round(batches * r / self.size) for r in range(self.size + 1)]
        parts = [range(bounds[r], bounds[r + 1]) for r in range(self.size)]
        return self._exchange([("score", served, part) for part in parts], lambda: local(served, parts[0]))

    def _exchange(self, messages: list[tuple], local: Callable[[], object]) -> list:
        """Send ``messages[r]`` to rank r, run ``local`` here, gather every rank's answer (rank order)."""
        self._exchanging = True
        for rank in range(1, self.size):
            self._channel.send(messages[rank], rank)
        answers = [local(), *(self._channel.receive(rank) for rank in range(1, self.size))]
        self._exchanging = False
        for answer in answers:
            if isinstance(answer, WorkerFailure):
                log.error("worker %d failed:\n%s", answer.rank, answer.details)
                self._logs = None  # keep them
                raise RuntimeError(f"worker {answer.rank} failed: {answer.error}")
        return answers

    def close(self) -> None:
        """Stop the workers and leave the group. Workers that cannot be told to stop (the group never
        formed, or an exchange was interrupted), or that do not stop within 30 s, are killed."""
        told = self._channel is not None and not self._exchanging
        if told:
            for rank in range(1, self.size):
                try:
                    self._channel.send(("stop",), rank)
                except RuntimeError as err:  # that worker is gone already
                    log.warning("stopping worker %d: %s", rank, err)
        self._channel = None
        for proc in self._processes:
            try:
                proc.wait(timeout=30 if told else 0)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        self._processes = []
        torch.set_num_threads(self._threads)
        if self._logs is not None and not self._exchanging:  # a run that went wrong keeps its workers' logs
            shutil.rmtree(self._logs, ignore_errors=True)


class Channel:
    """Python objects between the ranks of a gloo process group of its own (pickled, sent point to
    point), so that several groups can live in one process beside any default group."""

    def __init__(self, store: dist.Store, rank: int, size: int) -> None:
        self.group = dist.ProcessGroupGloo(dist.PrefixStore(_GROUP_PREFIX, store), rank, size, _COLLECTIVE_TIMEOUT)

    def send(self, obj: object, rank: int) -> None:
        data = torch.frombuffer(bytearray(pickle.dumps(obj, protocol=pickle.HIGHEST_PROTOCOL)), dtype=torch.uint8)
        self.group.send([torch.tensor([data.numel()], dtype=torch.int64)], rank, 0).wait()
        if data.numel():
            self.group.send([data], rank, 1).wait()

    def receive(self, rank: int) -> object:
        size = torch.zeros(1, dtype=torch.int64)
        self.group.recv([size], rank, 0).wait()
        data = torch.empty(int(size), dtype=torch.uint8)
        if data.numel():
            self.group.recv([data], rank, 1).wait()
        return pickle.loads(data.numpy().tobytes())


def _launcher_store(rank: int, size: int) -> dist.TCPStore:
    """The store at ``MASTER_ADDR:MASTER_PORT``: hosted by rank 0 unless the launcher hosts it
    (``torchrun``'s agent does, and says so in ``TORCHELASTIC_USE_AGENT_STORE``)."""
    host = rank == 0 and os.environ.get("TORCHELASTIC_USE_AGENT_STORE", "").lower() != "true"
    return dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), size, is_master=host,
                         timeout=timedelta(seconds=_START_TIMEOUT_S), wait_for_workers=False)


def _env_threads() -> int | None:
    """``OMP_NUM_THREADS`` where it is set to a positive count, else None."""
    try:
        return max(1, int(os.environ["OMP_NUM_THREADS"]))
    except (KeyError, ValueError):
        return None


def _free_port(host: str = "127.0.0.1") -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def serve() -> None:
    """A worker's life: join the group, receive the run's settings, and answer rank 0's messages
    (train a share of a round, score a share of the test set) until it says stop. Stop signals are
    left to rank 0, which finishes its round and then stops the workers."""
    from lptfl.experiment.assembly import RunAssembly

    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    rank, size = launched_rank()
    store = _launcher_store(rank, size)
    store.set(f"started/{rank}", "1")
    channel = Channel(store, rank, size)
    config: RunConfig = channel.receive(0)
    if config.device.startswith("cuda") and ":" not in config.device and torch.cuda.device_count() > 1:
        config = replace(config, device=f"cuda:{int(os.environ.get('LOCAL_RANK', rank)) % torch.cuda.device_count()}")
    run: RunAssembly | None = None
    clients: ClientSide | None = None
    while (message := channel.receive(0))[0] != "stop":
        try:
            if run is None:
                run = RunAssembly(config)
                clients = ClientSide.of(run)
            if message[0] == "train":
                answer = clients.train(message[1])
            else:
                answer = run.scorer.sums(message[1], message[2])
        except Exception as err:  # reported to rank 0, which stops the run
            answer = WorkerFailure(rank, f"{type(err).__name__}: {err}", traceback.format_exc())
        channel.send(answer, 0)


if __name__ == "__main__":
    from lptfl.sim import workers  # this module under its own name: what it sends unpickles on rank 0

    logging.basicConfig(level=logging.WARNING, format=f"%(levelname)s worker {os.environ.get('RANK')} %(name)s: %(message)s")
    workers.serve()
