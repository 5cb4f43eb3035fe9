"""Resumable run grids (lptfl.sim.grid)."""

from __future__ import annotations

import json
import os
import signal
import tarfile
import threading
import time

import pytest

from lptfl.sim.grid import GridRun, archive, rounds_done, run_command, run_grid
from lptfl.experiment.checkpoint import load_checkpoint

TINY = ("--model_width", "4", "--num_clients", "4", "--frac", "0.5", "--compile", "off")


def test_grid_runs_in_parallel_skips_finished_runs_and_extends_a_partial_one(tmp_path):
    runs = [GridRun(tmp_path / f"s{seed}", (*TINY, "--seed", str(seed))) for seed in (0, 1)]
    refreshed = []
    run_grid(runs, 1, parallel=2, after_each=lambda: refreshed.append(1), poll_s=0.2)
    assert [rounds_done(r.run_dir) for r in runs] == [1, 1] and len(refreshed) == 2
    assert run_command(runs[0], 1) is None  # finished: nothing to do
    assert "--resume" in run_command(runs[0], 2)  # a longer target: the run continues from its checkpoint
    run_grid(runs[:1], 2, poll_s=0.2, threads=1)  # the count it started with (2 cpus here / parallel 2)
    lines = (runs[0].run_dir / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line)["round"] for line in lines] == [1, 2]
    assert load_checkpoint(runs[0].run_dir).numerics["threads"] == 1
    archive(tmp_path, tmp_path / "out.tar.gz")
    with tarfile.open(tmp_path / "out.tar.gz") as tar:
        names = tar.getnames()
    assert any(n.endswith("s1/metrics.jsonl") for n in names)
    assert not any("checkpoint" in n for n in names)


def test_runs_take_turns_of_rounds_keeping_their_full_length(tmp_path):
    runs = [GridRun(tmp_path / f"s{seed}", (*TINY, "--seed", str(seed))) for seed in (0, 1)]
    progress = []
    run_grid(runs, 2, parallel=1, turn_rounds=1, poll_s=0.1,
             after_each=lambda: progress.append(tuple(rounds_done(r.run_dir) for r in runs)))
    assert progress == [(1, 0), (1, 1), (2, 1), (2, 2)]
    for run in runs:
        assert json.loads((run.run_dir / "config.json").read_text())["c_rounds"] == 2
    resume = run_command(runs[0], 5, stop_after=3)
    assert resume[resume.index("--stop_after") + 1] == "3" and resume[resume.index("--c_rounds") + 1] == "5"
    assert "--stop_after" not in run_command(runs[0], 5, stop_after=5)
    for workers in (1, 3):  # every run says how many processes train it: the grid shares out the cores
        command = run_command(runs[0], 5, workers=workers)
        assert command[command.index("--workers") + 1] == str(workers)
    with pytest.raises(ValueError, match="turn_rounds"):
        run_grid(runs, 2, turn_rounds=-1)


def test_grid_reports_a_failed_run(tmp_path):
    with pytest.raises(RuntimeError, match="bad"):
        run_grid([GridRun(tmp_path / "bad", ("--alpha", "-1"))], 1, poll_s=0.1)
    with pytest.raises(ValueError, match="parallel"):
        run_grid([], 1, parallel=0)
    with pytest.raises(ValueError, match="threads must be >= 0"):
        run_grid([], 1, threads=-1)


def test_a_signal_stops_the_grid_started_with_sigint_ignored_and_each_run_checkpoints(tmp_path):
    """A shell's background job ignores SIGINT; the grid still stops, and its run saves a round."""
    run = GridRun(tmp_path / "r", TINY)

    def interrupt_once_running() -> None:  # after its first round, or after 5 minutes (the test then fails)
        deadline = time.monotonic() + 300
        while not (run.run_dir / "metrics.jsonl").exists() and time.monotonic() < deadline:
            time.sleep(0.1)
        os.kill(os.getpid(), signal.SIGINT)

    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        threading.Thread(target=interrupt_once_running, daemon=True).start()
        with pytest.raises(KeyboardInterrupt, match="SIGINT"):
            run_grid([run], 1000, poll_s=0.1)
        assert signal.getsignal(signal.SIGINT) is signal.SIG_IGN
    finally:
        signal.signal(signal.SIGINT, previous)
    assert 1 <= rounds_done(run.run_dir) < 1000
    assert "--resume" in run_command(run, 1000)


def test_run_command_sets_checkpoints_and_carries_where_a_resumed_run_runs(tmp_path):
    run = GridRun(tmp_path / "r", ("--alpha", "0.1", "--device", "cuda", "--data_path", "d", "--seed", "3"))
    start = run_command(run, 5, checkpoint_every=10)
    assert start[start.index("--checkpoint_every") + 1] == "10" and "--alpha" in start
    run.run_dir.mkdir()
    (run.run_dir / "config.json").write_text("{}")
    resume = run_command(run, 5)
    assert resume[resume.index("--resume") + 1] == str(run.run_dir)
    assert resume[resume.index("--device") + 1] == "cuda" and resume[resume.index("--data_path") + 1] == "d"
    assert "--alpha" not in resume and "--seed" not in resume  # the run's own settings come from its folder
