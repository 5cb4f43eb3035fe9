"""Both scores of the served model every evaluated round (fp32 activations, the run's activation
format), which one is ``test_accuracy`` (``--eval_precision``), and ``--eval_every``."""

from __future__ import annotations

import glob
import json
import math
from pathlib import Path

import pytest

from lptfl.cli import main
from lptfl.experiment import evaluation
from lptfl.experiment.config import SAVED_DEFAULTS, RunConfig
from lptfl.experiment.evaluation import is_evaluated
from lptfl.experiment.results import TEST_FIELDS, compare_rounds, read_metrics
from lptfl.report import describe, table, window_verdicts
from lptfl.sim.engine import Simulation
from lptfl.sim.runner import run_experiment

FAST = dict(compile="off", model_width=8, num_clients=4, frac=0.5, epochs=1, batch_size=32)
Q8 = dict(use_quantization=True, quantization_bits=8)
ROOT = Path(__file__).resolve().parents[2]


def test_each_round_holds_both_scores_and_test_accuracy_follows_the_published_protocol():
    """Same training, three choices of --eval_precision: the named scores agree; test_accuracy is
    fp32 activations with the moving average under "paper", the other named score otherwise."""
    rounds = {precision: Simulation(RunConfig(c_rounds=1, moving_average=True, eval_precision=precision,
                                              **Q8, **FAST)).run_round()
              for precision in ("paper", "policy", "full")}
    paper, policy, full = rounds["paper"], rounds["policy"], rounds["full"]
    assert paper.test_loss_fp32_act != paper.test_loss_policy_act  # 8-bit activations score differently
    for other in (policy, full):
        assert other.train_loss == paper.train_loss  # the same training
        assert (other.test_loss_fp32_act, other.test_loss_policy_act) == (paper.test_loss_fp32_act,
                                                                          paper.test_loss_policy_act)
    assert (paper.test_accuracy, paper.test_loss) == (paper.test_accuracy_fp32_act, paper.test_loss_fp32_act)
    assert (full.test_accuracy, full.test_loss) == (full.test_accuracy_fp32_act, full.test_loss_fp32_act)
    assert (policy.test_accuracy, policy.test_loss) == (policy.test_accuracy_policy_act, policy.test_loss_policy_act)


def test_without_the_moving_average_the_paper_protocol_scores_the_runs_activation_format():
    config = RunConfig(c_rounds=1, **Q8, **FAST)
    assert config.eval_precision == "paper" and config.scored_activations() == "policy_act"
    assert RunConfig(moving_average=True).scored_activations() == "fp32_act"
    metrics = Simulation(config).run_round()
    assert (metrics.test_accuracy, metrics.test_loss) == (metrics.test_accuracy_policy_act,
                                                          metrics.test_loss_policy_act)


@pytest.mark.parametrize("quantized", [False, True], ids=["fp32", "8bit"])
def test_an_fp32_run_is_evaluated_once_and_records_both_scores(monkeypatch, quantized):
    calls = []
    real = evaluation.evaluate_sums
    monkeypatch.setattr(evaluation, "evaluate_sums", lambda *args, **kw: calls.append(1) or real(*args, **kw))
    extra = Q8 if quantized else {}
    metrics = Simulation(RunConfig(c_rounds=1, moving_average=True, **extra, **FAST)).run_round()
    assert len(calls) == (2 if quantized else 1)
    if not quantized:
        assert metrics.test_accuracy_fp32_act == metrics.test_accuracy_policy_act == metrics.test_accuracy
        assert metrics.test_loss_fp32_act == metrics.test_loss_policy_act == metrics.test_loss


def test_eval_every_scores_every_nth_round_and_always_the_last_five(tmp_path):
    config = RunConfig(c_rounds=8, eval_every=3, **FAST)
    assert [r for r in range(1, 9) if is_evaluated(config, r)] == [3, 4, 5, 6, 7, 8]
    every = run_experiment(RunConfig(c_rounds=8, **FAST), tmp_path / "every", progress=False)
    sparse = run_experiment(config, tmp_path / "sparse", progress=False)
    rows = read_metrics(tmp_path / "sparse")
    for row in rows:
        measured = [row[name] is not None for name in TEST_FIELDS]
        assert all(measured) if row["round"] >= 3 else not any(measured), row
    # evaluation changes nothing else: the rounds both runs evaluated are identical
    result = compare_rounds(read_metrics(tmp_path / "every"), rows)
    assert result.identical == 8 and result.first_difference is None
    assert main(["compare", str(tmp_path / "every"), str(tmp_path / "sparse")]) == 0
    # the summary's figure is the same last 5 rounds
    assert sparse["evaluated_rounds"] == 6 and every["evaluated_rounds"] == 8
    for key in ("final_accuracy_mean", "final_accuracy_std", "final_accuracy_fp32_act_mean",
                "final_accuracy_policy_act_mean", "final_test_loss"):
        assert sparse[key] == every[key] is not None
    # report and curves cope with the rounds not evaluated
    row = describe(tmp_path / "sparse")
    assert math.isnan(row["curve"][0]) and math.isnan(row["curve"][1]) and not math.isnan(row["curve"][2])
    assert row["mean"] == pytest.approx(100 * sparse["final_accuracy_mean"])
    assert "| sparse |" in table([tmp_path / "sparse"])
    assert (tmp_path / "sparse" / "curves.png").stat().st_size > 1000
    lines = window_verdicts({"a": row, "b": describe(tmp_path / "every")}, "a", [("b", 0.0)], first_end=5)
    # windows ending at 5 and 6 hold round 1 or 2, which "sparse" did not evaluate
    assert lines[0].startswith("- a >= b + 0.0 points: holds in 2 of 2 windows ending at rounds 5-8 (2 with a round "
                               "not evaluated left out) (mean over rounds 1-8: ")
    mean = lines[0].rsplit(": ", 1)[1]
    assert mean.split(" vs ")[0] == mean.split(" vs ")[1].rstrip(")")  # over the rounds both evaluated


def test_a_run_with_eval_every_resumes_into_the_same_rounds(tmp_path, capsys):
    whole = RunConfig(c_rounds=7, eval_every=2, **FAST)
    run_experiment(whole, tmp_path / "whole", progress=False)
    run_experiment(whole, tmp_path / "parts", progress=False, stop_after=1)  # round 1: not evaluated
    assert read_metrics(tmp_path / "parts")[0]["test_accuracy"] is None
    assert main(["run", "--resume", str(tmp_path / "parts"), "--eval_every", "3", "--quiet"]) == 0
    assert "last 5 evaluated rounds" in capsys.readouterr().out
    resumed = read_metrics(tmp_path / "parts")
    assert [r["round"] for r in resumed if r["test_accuracy"] is not None] == [3, 4, 5, 6, 7]
    assert compare_rounds(read_metrics(tmp_path / "whole"), resumed).first_difference is None


def test_eval_every_must_be_positive():
    with pytest.raises(ValueError, match="eval_every"):
        RunConfig(eval_every=0).validate()


def test_lines_written_before_both_scores_keep_their_meaning(tmp_path):
    """A metrics line with only test_accuracy: the run's activation format unless eval_precision
    was full; both for an fp32 run; a config without eval_precision predates it (policy)."""
    cases = {
        "q8-policy": ({"use_quantization": True, "quantization_bits": 8, "moving_average": True}, (None, 70.0), "policy_act"),
        "q8-full": ({"use_quantization": True, "eval_precision": "full"}, (70.0, None), "fp32_act"),
        "fp32": ({"use_quantization": False, "eval_precision": "policy"}, (70.0, 70.0), "policy_act"),
    }
    for name, (config, (fp32_act, policy_act), scored) in cases.items():
        run = tmp_path / name
        run.mkdir()
        (run / "config.json").write_text(json.dumps(config))
        (run / "metrics.jsonl").write_text("".join(
            json.dumps({"round": r, "test_accuracy": 0.7, "test_loss": 1.0, "bytes_up": 1}) + "\n" for r in (1, 2)))
        row = describe(run)
        assert (row["mean"], row["mean_fp32_act"], row["mean_policy_act"], row["scored_with"]) == (
            pytest.approx(70.0), fp32_act and pytest.approx(fp32_act), policy_act and pytest.approx(policy_act), scored)
    assert "| q8-policy | ? | ? | w avg | 8 bit | 2 | 70.0 +- 0.0 | policy act. | - | 70.0 |" in table(
        [tmp_path / "q8-policy"])


def test_fingerprints_of_committed_runs_stay_valid():
    """eval_precision's default moved from policy to paper: a saved config that says policy, or
    predates the setting, keeps the fingerprint its summary recorded."""
    summaries = sorted(glob.glob(str(ROOT / "results" / "**" / "summary.json"), recursive=True))
    assert summaries
    for path in summaries:
        summary = json.loads(Path(path).read_text())
        config = RunConfig.from_dict({**SAVED_DEFAULTS, **summary["config"]})
        assert config.fingerprint() == summary["config_fingerprint"], path
    assert RunConfig(eval_precision="policy").fingerprint() != RunConfig().fingerprint()
