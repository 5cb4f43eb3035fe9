"""``--cohort``: a run whose clients train as one batched model gives the rounds of one whose
clients train one after another, and the two resume into each other."""

from __future__ import annotations

import logging

import pytest
import torch

from lptfl.experiment.config import RunConfig
from lptfl.experiment.results import compare_rounds, read_metrics
from lptfl.sim.engine import Simulation
from lptfl.sim.runner import run_experiment

# an MLP with fp32 products: every operation of the two paths is the same, so rounds are identical
FAST = dict(compile="off", compute="fp32", model_name="MLP", num_clients=6, frac=0.5, epochs=2, batch_size=16)
Q8 = dict(use_quantization=True, quantization_bits=8, moving_average=True)


@pytest.mark.parametrize("precision", [{}, Q8], ids=["fp32", "q8"])
def test_batched_cohort_rounds_equal_sequential_rounds(precision):
    rounds = {}
    for cohort in ("off", "on"):
        sim = Simulation(RunConfig(c_rounds=3, cohort=cohort, **FAST, **precision))
        rounds[cohort] = [sim.run_round() for _ in range(3)]
    for ours, theirs in zip(rounds["on"], rounds["off"]):
        assert ours.test_accuracy == theirs.test_accuracy
        assert ours.train_loss == pytest.approx(theirs.train_loss, rel=1e-6)
        assert ours.bytes_up == theirs.bytes_up


def test_cohort_size_splits_the_round_into_several_batched_steps():
    whole = Simulation(RunConfig(c_rounds=1, cohort="on", **FAST, **Q8)).run_round()
    split = Simulation(RunConfig(c_rounds=1, cohort="on", cohort_size=2, **FAST, **Q8)).run_round()
    assert (split.test_accuracy, split.train_loss) == (whole.test_accuracy, whole.train_loss)


def test_a_cohort_that_runs_out_of_memory_is_halved_until_it_fits(monkeypatch, caplog):
    from lptfl.fl.cohort import CohortTrainer

    whole = Simulation(RunConfig(c_rounds=2, cohort="on", **FAST, **Q8))
    expected = [whole.run_round() for _ in range(2)]
    real_train, sizes = CohortTrainer.train, []

    def train_two_at_most(self, clients, **kwargs):
        sizes.append(len(clients))
        if len(clients) > 2:
            raise torch.OutOfMemoryError("out of memory (test)")
        return real_train(self, clients, **kwargs)

    monkeypatch.setattr(CohortTrainer, "train", train_two_at_most)
    sim = Simulation(RunConfig(c_rounds=2, cohort="on", **FAST, **Q8))
    with caplog.at_level(logging.WARNING):
        rounds = [sim.run_round() for _ in range(2)]
    assert sizes == [3, 1, 1, 1, 1, 1, 1]  # 3 clients a round: 3 fails, halved to 1 for the rest of the run
    assert "ran out of memory; 1 clients per step" in caplog.text
    assert [(r.test_accuracy, r.train_loss) for r in rounds] == [(r.test_accuracy, r.train_loss) for r in expected]


def test_a_run_resumes_across_cohort_modes(tmp_path):
    config = RunConfig(c_rounds=3, cohort="on", **FAST, **Q8)
    run_experiment(config, tmp_path / "whole", progress=False)
    run_experiment(config, tmp_path / "split", progress=False, stop_after=2)
    run_experiment(RunConfig(c_rounds=3, cohort="off", **FAST, **Q8), tmp_path / "split", progress=False, resume=True)
    whole, split = read_metrics(tmp_path / "whole"), read_metrics(tmp_path / "split")
    result = compare_rounds(whole, split)
    assert (result.compared, result.identical, result.first_difference) == (3, 3, None)


def test_unbatchable_runs_say_why_and_train_one_client_at_a_time(caplog):
    with caplog.at_level(logging.INFO, logger="lptfl.sim.client_side"):
        sim = Simulation(RunConfig(c_rounds=1, cohort="on", optimizer="sgd", **FAST))
    assert sim.clients.cohort is None
    assert "only Adam's update is batched" in caplog.text
    with caplog.at_level(logging.INFO, logger="lptfl.sim.client_side"):
        assert Simulation(RunConfig(c_rounds=1, **FAST)).clients.cohort is None  # auto: not on a CPU
    assert "one at a time (--cohort auto on cpu)" in caplog.text


def test_compile_auto_compiles_where_it_pays_off():
    from lptfl.experiment.setup import compile_plan

    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    digits = RunConfig(use_quantization=True)  # the README's default job: ~300 steps, 360 test images a round
    plan = compile_plan(digits, [144] * 10, 360, cpu, full_precision=False)
    assert (plan.train, plan.eval) == (False, False) and "~300 local steps" in plan.reason
    paper = RunConfig(use_quantization=True, num_clients=80, frac=0.4, c_rounds=200)
    assert compile_plan(paper, [750] * 80, 10_000, cpu, full_precision=False).parts == (True, True)
    two_rounds = RunConfig(use_quantization=True, num_clients=80, frac=0.4, c_rounds=2)
    assert compile_plan(two_rounds, [750] * 80, 10_000, cpu, full_precision=False).parts == (True, True)
    assert compile_plan(digits, [144] * 10, 360, cuda, full_precision=False).parts == (True, True)
    assert compile_plan(paper, [750] * 80, 10_000, cpu, full_precision=True).parts == (False, False)
    forced = RunConfig(use_quantization=True, compile="on")
    assert compile_plan(forced, [144] * 10, 360, cpu, full_precision=False).parts == (True, True)
