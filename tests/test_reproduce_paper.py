"""benchmarks/reproduce_paper.py without training: run folders per alpha and seed, and the table
written from run folders at several alphas."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

_PATH = Path(__file__).resolve().parents[1] / "benchmarks" / "reproduce_paper.py"
_SPEC = importlib.util.spec_from_file_location("reproduce_paper", _PATH)
reproduce = importlib.util.module_from_spec(_SPEC)
_SPEC.loader.exec_module(reproduce)


def test_run_folders_tag_alpha_and_seed_only_off_their_defaults():
    assert reproduce.run_folder("q8-avg", 0.01, 0) == "q8-avg"
    assert reproduce.run_folder("q8-avg", 0.01, 2) == "q8-avg-s2"
    assert reproduce.run_folder("q8-avg", 0.04, 0) == "q8-avg-a0.04"
    assert reproduce.run_folder("q8-noavg", 0.16, 1) == "q8-noavg-a0.16-s1"


@given(st.sampled_from(sorted(reproduce.CONFIGS)), st.sampled_from([0.01, 0.04, 0.16, 1.0, 1e-05, 10.0]),
       st.integers(0, 20))
def test_the_alpha_tag_comes_off_and_leaves_the_config_and_seed(config, alpha, seed):
    assert reproduce.without_alpha_tag(reproduce.run_folder(config, alpha, seed)) == reproduce.run_folder(
        config, reproduce.DEFAULT_ALPHA, seed)


def fake_run(root: Path, folder: str, alpha: float, accuracy: float, moving_average: bool) -> Path:
    """A finished-looking run folder: its config and 5 evaluated rounds at ``accuracy`` (a fraction)."""
    run = root / folder
    run.mkdir()
    config = {"alpha": alpha, "dataset": "fmnist", "moving_average": moving_average, "eval_precision": "paper",
              "use_quantization": "fp32" not in folder, "quantization_bits": 8}
    (run / "config.json").write_text(json.dumps(config))
    lines = [{"round": r, "test_accuracy": accuracy, "test_loss": 1.0, "bytes_up": 10,
              "test_accuracy_fp32_act": accuracy, "test_accuracy_policy_act": accuracy - 0.01} for r in range(1, 6)]
    (run / "metrics.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))
    return run


def test_the_table_has_a_section_per_alpha_with_the_paper_figures_and_paired_claim(tmp_path):
    runs = [fake_run(tmp_path, reproduce.run_folder(config, alpha, seed), alpha, accuracy, config.endswith("-avg"))
            for alpha in (0.01, 0.04) for seed in (0, 1)
            for config, accuracy in (("q8-avg", 0.80), ("q8-noavg", 0.70), ("fp32-noavg", 0.78 + 0.02 * seed))]
    reproduce.write_table(tmp_path, runs, rounds=5)
    text = (tmp_path / "table.md").read_text()
    first, second = text.split("## Alpha 0.01")[1].split("## Alpha 0.04")
    assert "| q8-avg | 5 | 80.0 +- 0.0 | 80.1 +- 0.7 |" in first
    assert "| q8-avg | 5 | 80.0 +- 0.0 | 83.8 +- 0.1 |" in second  # the paper's alpha 0.04 column
    assert "| q8-avg-s1 | 5 |" in second and "a0.04" not in second.split("### Details")[0]
    for section in (first, second):
        assert "q8-avg - fp32-noavg >= -1.0 points: +1.00 +- 1.41 over 2 seeds (s0 +2.0, s1 +0.0): holds" in section
        assert "q8-avg - q8-noavg >= +3.0 points: +10.00 +- 0.00 over 2 seeds" in section
        assert "| q8-noavg | 0,1 | 5 | 70.0 +- 0.0 | 70.0 +- 0.0 | 69.0 +- 0.0 | " in section


def test_a_narrow_proxy_with_one_seed_still_judges_the_claim_without_the_paper(tmp_path):
    runs = [fake_run(tmp_path, reproduce.run_folder(config, 0.16, 0), 0.16, accuracy, config.endswith("-avg"))
            for config, accuracy in (("q8-avg", 0.75), ("q8-noavg", 0.74), ("fp32-noavg", 0.77))]
    reproduce.write_table(tmp_path, runs, rounds=5, width=32)
    text = (tmp_path / "table.md").read_text()
    assert "ConvNet width 32" in text and "90.6" not in text  # no paper figure beside a proxy
    assert "q8-avg - fp32-noavg >= -1.0 points: -2.00 on one seed (s0 -2.0): does not hold" in text
    assert "q8-avg - q8-noavg >= +3.0 points: +1.00 on one seed (s0 +1.0): does not hold" in text
    assert "| q8-avg | 0 | 5 | 75.0 | " in text  # one seed has no sd over seeds


def test_a_bad_alpha_list_stops_with_a_one_line_error():
    assert reproduce.numbers("0.01,0.04", float, "--alpha") == [0.01, 0.04]
    with pytest.raises(SystemExit, match=r"--alpha '0.01,x': expected comma-separated float values"):
        reproduce.numbers("0.01,x", float, "--alpha")
    assert reproduce.numbers("0.01,0.010,1e-2,0.04", float, "--alpha") == [0.01, 0.04]  # repeats dropped


def test_the_width_comes_from_the_runs_and_one_table_holds_one_width(tmp_path):
    """Width-32 runs tabled without --model_width are still kept away from the paper's figures; a
    folder with two widths, or a --model_width the runs contradict, is refused."""
    runs = [fake_run(tmp_path, name, 0.01, 0.75, name.endswith("-avg")) for name in ("q8-avg", "q8-noavg")]
    assert reproduce.table_width(runs, 0) == 0
    for run in runs:
        config = json.loads((run / "config.json").read_text())
        (run / "config.json").write_text(json.dumps({**config, "model_width": 32}))
    assert reproduce.table_width(runs, 0) == 32
    with pytest.raises(SystemExit, match="--model_width 16, but the runs in .* have width 32"):
        reproduce.table_width(runs, 16)
    other = fake_run(tmp_path, "fp32-noavg", 0.01, 0.77, False)
    with pytest.raises(SystemExit, match=r"have ConvNet widths \[0, 32\]"):
        reproduce.table_width([*runs, other], 0)


def test_a_damaged_or_unscored_run_gets_no_verdict_and_stops_no_table(tmp_path, caplog):
    runs = [fake_run(tmp_path, reproduce.run_folder(config, 0.01, 0), 0.01, accuracy, config.endswith("-avg"))
            for config, accuracy in (("q8-avg", 0.80), ("q8-noavg", 0.70), ("fp32-noavg", 0.78))]
    (runs[1] / "metrics.jsonl").write_text('{"round": 1, "test_accuracy": null, "bytes_up": 10}\n')  # not scored yet
    with open(runs[2] / "metrics.jsonl", "a") as handle:
        handle.write("42\n")  # damaged
    reproduce.write_table(tmp_path, runs, rounds=5)
    text = (tmp_path / "table.md").read_text()
    assert "| q8-noavg | 1 | - | 72.2 +- 2.0 |" in text and "fp32-noavg" not in text
    assert "q8-noavg + 3.0" not in text and "nan" not in text
    assert "skipping" in caplog.text and "fp32-noavg/metrics.jsonl line 6 is 42" in caplog.text


@pytest.mark.parametrize("change, alphas, seeds, message", [
    ({}, [-1.0], [0], "--alpha: expected a number > 0, got -1.0"),
    ({}, [0.01], [-2], "--seed: expected an integer >= 0, got -2"),
    ({"parallel": 0}, [0.01], [0], "--parallel 0: expected an integer >= 1"),
    ({"device": "gpu"}, [0.01], [0], 'device: expected cpu, cuda or cuda:N, got "gpu"'),
])
def test_a_value_every_run_would_refuse_stops_the_grid_before_it_starts(change, alphas, seeds, message):
    import argparse

    args = argparse.Namespace(**{**dict(rounds=200, parallel=1, workers=1, eval_every=1, checkpoint_every=1,
                                        turn_rounds=0, threads=0, model_width=0, device="cpu"), **change})
    with pytest.raises(SystemExit, match=message):
        reproduce.check_grid_values(args, alphas, seeds)
