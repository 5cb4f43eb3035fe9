"""benchmarks/bench_vs_flower.py without running either job: the Flower app gets the very config
``lptfl run`` builds from the job's flags, and the accuracy check compares round by round."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

from lptfl.flower.config import FlowerOptions, from_flower_config, to_flower_config

_PATH = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_vs_flower.py"
_SPEC = importlib.util.spec_from_file_location("bench_vs_flower", _PATH)
bench = importlib.util.module_from_spec(_SPEC)
_SPEC.loader.exec_module(bench)


def test_the_flower_app_runs_the_job_lptfl_run_runs():
    config = bench.job_config(bench.job_flags(3, 3))
    assert (config.dataset, config.num_clients, config.frac, config.c_rounds) == ("digits", 3, 1.0, 3)
    assert config.use_quantization and config.quantization_bits == 8 and config.moving_average
    flower_config, options = from_flower_config(to_flower_config(config, FlowerOptions(min_nodes=3)))
    assert flower_config == config and options.min_nodes == 3


def rows(*accuracies: float) -> list[dict]:
    return [{"round": i + 1, "test_accuracy": a} for i, a in enumerate(accuracies)]


def test_accuracies_are_compared_round_by_round():
    assert bench.compare_accuracies(rows(0.4, 0.5), rows(0.4, 0.5), 1e-6) == (0.0, True)
    max_diff, agree = bench.compare_accuracies(rows(0.4, 0.5), rows(0.4, 0.51), 1e-6)
    assert max_diff == pytest.approx(0.01) and not agree
    with pytest.raises(ValueError, match="rounds recorded"):
        bench.compare_accuracies(rows(0.4, 0.5), rows(0.4), 1e-6)
    with pytest.raises(ValueError, match="rounds recorded"):
        bench.compare_accuracies([], [], 1e-6)
