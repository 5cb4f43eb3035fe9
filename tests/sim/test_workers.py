"""``--workers``: a round's clients trained by several processes give the rounds of one process, the
clients' state travels between them, a run resumes with another count, and failures end the run in
one line instead of a hang."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from lptfl.cli import main
from lptfl.experiment.config import RunConfig
from lptfl.experiment.results import compare_rounds, read_metrics
from lptfl.sim.engine import Simulation
from lptfl.sim.runner import run_experiment
from lptfl.sim.workers import worker_count

# every client in every round: its Adam state (and FedBN's batch norm) must move between processes
SMALL = dict(dataset="digits", num_clients=4, frac=1.0, batch_size=64, model_width=8, compile="off")
Q8 = dict(use_quantization=True, quantization_bits=8, moving_average=True)


@pytest.fixture(autouse=True)
def one_thread(monkeypatch):
    """Each process computes with one thread, as this test process does (conftest), so that the
    rounds of one process and of several are bit for bit the same."""
    monkeypatch.setenv("OMP_NUM_THREADS", "1")


def rounds_of(config: RunConfig, count: int) -> tuple[list, dict]:
    with Simulation(config) as sim:
        rounds = [sim.run_round() for _ in range(config.c_rounds)]
        assert (sim.workers.size if sim.workers is not None else 1) == config.workers
        return rounds, sim.server.state_dict()


@pytest.mark.parametrize("extra", [Q8, dict(aggregation_mode="fedbn", **Q8), dict(aggregation_mode="fedgen"),
                                   dict(aggregation_mode="fedprox", lambda_fedprox=0.01)],
                         ids=["q8-avg", "fedbn", "fedgen", "fedprox"])
def test_rounds_of_two_processes_equal_rounds_of_one(extra):
    one, state_one = rounds_of(RunConfig(c_rounds=2, workers=1, **SMALL, **extra), 1)
    two, state_two = rounds_of(RunConfig(c_rounds=2, workers=2, **SMALL, **extra), 2)
    for a, b in zip(one, two):
        assert (a.test_accuracy, a.train_loss, a.bytes_up, a.vote_accuracy) == \
               (b.test_accuracy, b.train_loss, b.bytes_up, b.vote_accuracy)
        assert a.test_loss == pytest.approx(b.test_loss, rel=1e-12)  # sums of two parts of the test set
    assert state_one.keys() == state_two.keys()
    assert all(torch.equal(state_one[k], state_two[k]) for k in state_one)


def test_three_processes_share_an_uneven_round(tmp_path):
    config = dict(SMALL, num_clients=5, frac=1.0, c_rounds=2, **Q8)
    run_experiment(RunConfig(workers=1, **config), tmp_path / "one", progress=False)
    run_experiment(RunConfig(workers=3, **config), tmp_path / "three", progress=False)
    result = compare_rounds(read_metrics(tmp_path / "one"), read_metrics(tmp_path / "three"))
    assert (result.compared, result.identical) == (2, 2)


def test_a_run_resumes_with_another_number_of_workers(tmp_path):
    config = dict(SMALL, c_rounds=3, **Q8)
    run_experiment(RunConfig(workers=1, **config), tmp_path / "whole", progress=False)
    run_experiment(RunConfig(workers=2, **config), tmp_path / "split", progress=False, stop_after=2)
    run_experiment(RunConfig(workers=1, **config), tmp_path / "split", progress=False, resume=True)
    result = compare_rounds(read_metrics(tmp_path / "whole"), read_metrics(tmp_path / "split"))
    assert (result.compared, result.identical, result.first_difference) == (3, 3, None)


def test_auto_starts_workers_only_where_they_pay_off(monkeypatch):
    cores = {"n": 16}
    monkeypatch.setattr("lptfl.sim.workers.usable_cpus", lambda: cores["n"])
    long_run = RunConfig(c_rounds=200, **SMALL, **Q8)
    assert worker_count(long_run, 10_000)[0] == 4  # four cores a process, at most one per client of a round
    assert worker_count(RunConfig(c_rounds=200, **dict(SMALL, num_clients=2)), 10_000)[0] == 2
    assert worker_count(long_run, 100)[0] == 1  # too little work to repay a start
    assert worker_count(RunConfig(c_rounds=200, workers=3, **SMALL, **Q8), 100)[0] == 3  # as said
    assert worker_count(RunConfig(c_rounds=200, device="cuda", **SMALL, **Q8), 10_000)[0] == 1
    cores["n"] = 2
    assert worker_count(long_run, 10_000)[0] == 1  # two cores: one process with both threads


def test_a_failing_worker_stops_the_run_with_its_error(tmp_path, tiny_fmnist):
    data = tiny_fmnist(tmp_path / "data")
    sim = Simulation(RunConfig(dataset="fmnist", data_path=str(data), num_clients=4, frac=1.0, c_rounds=1,
                               batch_size=32, model_width=8, compile="off", workers=2, no_verify=True))
    try:
        shutil.rmtree(data)  # a worker loads the data at its first job: it fails, rank 0 does not
        with pytest.raises(RuntimeError, match="worker 1 failed: .*(not found|No such file|missing)"):
            sim.run_round()
    finally:
        sim.close()
    assert sim.workers is None


def test_a_killed_worker_ends_the_round_with_an_error_not_a_hang():
    sim = Simulation(RunConfig(c_rounds=2, workers=2, **SMALL, **Q8))
    try:
        sim.run_round()
        worker = sim.workers._processes[0]
        os.kill(worker.pid, signal.SIGKILL)
        worker.wait()
        with pytest.raises(RuntimeError):
            sim.run_round()
    finally:
        sim.close()


@pytest.mark.slow
def test_torchrun_ranks_train_the_rounds_of_one_process(tmp_path):
    torchrun = shutil.which("torchrun", path=os.path.dirname(sys.executable))
    assert torchrun is not None, "torchrun comes with torch"
    flags = ["--dataset", "digits", "--num_clients", "4", "--frac", "1.0", "--batch_size", "64", "--model_width", "8",
             "--compile", "off", "--c_rounds", "2", "--use_quantization", "--quantization_bits", "8",
             "--moving_average", "--quiet"]
    run_experiment(RunConfig(c_rounds=2, workers=1, **SMALL, **Q8), tmp_path / "one", progress=False)
    with socket.socket() as probe:  # torchrun's --master_port 0 leaves the ranks no store to reach
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    done = subprocess.run([torchrun, "--nproc_per_node", "2", "--master_addr", "127.0.0.1", "--master_port", str(port),
                           "-m", "lptfl", "run", *flags,
                           "--out", str(tmp_path / "ranks")], capture_output=True, text=True, timeout=300,
                          stdin=subprocess.DEVNULL, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stderr[-3000:]
    result = compare_rounds(read_metrics(tmp_path / "one"), read_metrics(tmp_path / "ranks"))
    assert (result.compared, result.identical) == (2, 2)


def processes_marked(marker: str) -> list[int]:
    """Processes whose environment holds ``LPTFL_TEST_RUN=marker`` (a run and its workers inherit it)."""
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and int(entry.name) != os.getpid():
            try:
                if f"LPTFL_TEST_RUN={marker}".encode() in (entry / "environ").read_bytes().split(b"\0"):
                    found.append(int(entry.name))
            except OSError:
                continue
    return found


@pytest.mark.slow
def test_ctrl_c_finishes_the_round_stops_the_workers_and_the_run_resumes(tmp_path):
    out, marker = tmp_path / "run", str(tmp_path)
    flags = ["--dataset", "digits", "--num_clients", "4", "--frac", "1.0", "--batch_size", "64", "--model_width", "8",
             "--compile", "off", "--c_rounds", "4", "--use_quantization", "--quantization_bits", "8",
             "--moving_average", "--quiet"]
    proc = subprocess.Popen([sys.executable, "-m", "lptfl", "run", *flags, "--workers", "2", "--out", str(out)],
                            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "OMP_NUM_THREADS": "1", "LPTFL_TEST_RUN": marker})
    try:
        deadline = time.monotonic() + 240
        while not ((out / "metrics.jsonl").exists() and b"\n" in (out / "metrics.jsonl").read_bytes()):
            assert proc.poll() is None, proc.communicate()
            assert time.monotonic() < deadline, "round 1 did not finish"
            time.sleep(0.1)
        assert len(processes_marked(marker)) == 2  # the run and its worker
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 128 + signal.SIGINT, err
    assert processes_marked(marker) == []  # the worker stopped with the run
    done = len(read_metrics(out))
    assert 1 <= done < 4
    run_experiment(RunConfig(c_rounds=4, workers=1, **SMALL, **Q8), tmp_path / "whole", progress=False)
    assert main(["run", "--resume", str(out), "--workers", "1", "--quiet"]) == 0
    result = compare_rounds(read_metrics(tmp_path / "whole"), read_metrics(out))
    assert (result.compared, result.identical) == (4, 4)
