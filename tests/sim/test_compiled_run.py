"""The 8-bit run with torch.compile, end to end through ``lptfl run``: what ``--compile auto`` gives a
long low-precision run (on a CPU it compiles only long runs, so this short one asks for ``on``). The
compiled training step and evaluation forward are checked against eager on their first call and
fall back with a warning when they differ; this run must need no fallback, and must learn."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from lptfl.experiment.results import read_metrics


@pytest.mark.slow
def test_a_compiled_8bit_run_completes_and_learns(tmp_path):
    out = tmp_path / "run"
    args = ["--use_quantization", "--compile", "on", "--model_width", "8", "--num_clients", "2", "--frac", "1.0",
            "--c_rounds", "2", "--out", str(out)]
    done = subprocess.run([sys.executable, "-m", "lptfl", "run", *args], env={**os.environ, "OMP_NUM_THREADS": "1"},
                          capture_output=True, text=True, timeout=600, stdin=subprocess.DEVNULL)
    assert done.returncode == 0, done.stderr[-4000:]
    assert "torch.compile: training step on, evaluation on" in done.stderr, done.stderr[-4000:]
    warnings = [line for line in done.stderr.splitlines() if line.startswith("WARNING")]
    assert not warnings, warnings  # e.g. "... continuing in eager mode"
    first, second = read_metrics(out)
    assert first["bytes_up"] > 0 and second["accepted"] == 2
    assert second["test_loss"] < first["test_loss"] and second["test_accuracy"] > first["test_accuracy"]
