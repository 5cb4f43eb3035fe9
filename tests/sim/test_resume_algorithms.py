"""FedBN, FedGen and FedFTG resume in a fresh process exactly: 2 rounds, then ``--resume`` to 3
in a new ``lptfl run`` process, against 3 rounds straight. Each round 3 depends on state only the
checkpoint carries over: every client's batch norm (FedBN), the generator and its optimizer (FedGen,
FedFTG); the 3 clients train every round."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from lptfl.cli import main
from lptfl.experiment.results import read_metrics

SMALL = ["--compile", "off", "--model_width", "8", "--num_clients", "3", "--frac", "1.0", "--quiet"]
ALGORITHMS = {
    "fedbn": ["--aggregation_mode", "fedbn", "--model_norm", "batchnorm"],
    "fedgen": ["--aggregation_mode", "fedgen"],
    "fedftg": ["--aggregation_mode", "fedftg", "--fedftg_iterations", "2", "--fedftg_batch_size", "16"],
}
TIMINGS = ("round_time_s", "wall_time_s", "phase_s")
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}  # the tests' one torch thread (tests/conftest.py): same sums


def lptfl_run(*args: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "lptfl", "run", *args], env=ENV, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, stdin=subprocess.DEVNULL)


def finish(process: subprocess.Popen) -> None:
    _, err = process.communicate(timeout=300)
    assert process.returncode == 0, err


def rounds_without_timings(run_dir) -> list[dict]:
    return [{k: v for k, v in line.items() if k not in TIMINGS} for line in read_metrics(run_dir)]


@pytest.mark.slow
@pytest.mark.parametrize("algorithm", sorted(ALGORITHMS))
def test_a_resumed_run_in_a_fresh_process_continues_exactly(tmp_path, algorithm):
    args = [*SMALL, *ALGORITHMS[algorithm]]
    interrupted, straight = tmp_path / "interrupted", tmp_path / "straight"
    first = lptfl_run(*args, "--c_rounds", "2", "--out", str(interrupted))
    try:
        assert main(["run", *args, "--c_rounds", "3", "--out", str(straight)]) == 0  # meanwhile, in this process
        finish(first)
    finally:
        if first.poll() is None:
            first.kill()
            first.wait()
    finish(lptfl_run("--resume", str(interrupted), "--c_rounds", "3", "--quiet"))
    expected = rounds_without_timings(straight)
    assert [r["round"] for r in expected] == [1, 2, 3]
    assert len({r["test_loss"] for r in expected}) == 3  # the model moves each round
    assert rounds_without_timings(interrupted) == expected
    assert json.loads((interrupted / "summary.json").read_text())["rounds"] == 3
