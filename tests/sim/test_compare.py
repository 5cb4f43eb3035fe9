"""Whether a rerun retraces a run: lptfl.experiment.results.compare_rounds and ``lptfl compare``."""

from __future__ import annotations

import json

from lptfl.cli import main
from lptfl.experiment.checkpoint import write_config
from lptfl.experiment.config import RunConfig
from lptfl.experiment.results import compare_rounds


def row(number: int, accuracy: float = 0.5, **extra) -> dict:
    return {"round": number, "test_accuracy": accuracy, "bytes_up": 100, "round_time_s": 1.0 + number,
            "wall_time_s": 10.0 * number, "phase_s": {"train": 0.5 * number}, **extra}


def write_run(run_dir, rows):
    run_dir.mkdir()
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))


def test_timings_are_ignored_and_only_shared_rounds_compared():
    reference = [row(1), row(2), row(3)]
    rerun = [{**row(1), "round_time_s": 99.0, "phase_s": {"train": 7.0}}, {**row(2), "wall_time_s": 0.0}]
    result = compare_rounds(reference, rerun)
    assert (result.reference_rounds, result.candidate_rounds, result.compared, result.identical) == (3, 2, 2, 2)
    assert result.first_difference is None


def test_the_earliest_difference_is_reported_with_its_fields():
    reference = [row(1), row(2), row(3), row(4)]
    rerun = [row(1), row(2, accuracy=0.6), row(3, bytes_up=101), row(4, accuracy=0.7, bytes_up=102)]
    result = compare_rounds(reference, rerun)
    assert (result.compared, result.identical) == (4, 1)
    assert result.first_difference == (2, ("test_accuracy",))
    # a field only one side has is a difference too
    assert compare_rounds([row(1)], [row(1, failed=1)]).first_difference == (1, ("failed",))


def test_nan_equals_nan_so_a_diverged_run_repeated_exactly_is_identical():
    nan = float("nan")
    diverged = [row(1, test_loss=nan, extra=[1.0, nan])]
    assert compare_rounds(diverged, [row(1, test_loss=nan, extra=[1.0, nan])]).first_difference is None
    assert compare_rounds(diverged, [row(1, test_loss=2.3, extra=[1.0, nan])]).first_difference == (1, ("test_loss",))
    assert compare_rounds(diverged, [row(1, test_loss=nan, extra=[1.0])]).first_difference == (1, ("extra",))


def test_cli_compare_exit_codes(tmp_path, capsys):
    write_run(tmp_path / "a", [row(1), row(2)])
    write_run(tmp_path / "b", [row(1)])
    write_run(tmp_path / "c", [row(1), row(2, accuracy=0.9)])
    write_run(tmp_path / "d", [row(5)])
    assert main(["compare", str(tmp_path / "a"), str(tmp_path / "b")]) == 0
    assert "identical in all fields but timings: 1 of 1" in capsys.readouterr().out
    assert main(["compare", str(tmp_path / "a"), str(tmp_path / "c")]) == 1
    out = capsys.readouterr().out
    assert "first difference: round 2 (test_accuracy)" in out and "settings differ" not in out
    write_config(tmp_path / "a", RunConfig(seed=1, compile="off"))
    write_config(tmp_path / "c", RunConfig(seed=2, compile="on"))  # --compile does not change results
    assert main(["compare", str(tmp_path / "a"), str(tmp_path / "c")]) == 1
    assert "the runs' settings differ: --seed 1 -> 2\n" in capsys.readouterr().out
    assert main(["compare", str(tmp_path / "a"), str(tmp_path / "d")]) == 1
    assert "no round in common" in capsys.readouterr().out
    assert main(["compare", str(tmp_path / "a"), str(tmp_path / "missing")]) == 2
    assert "no metrics.jsonl" in capsys.readouterr().err
    with open(tmp_path / "b" / "metrics.jsonl", "a") as handle:
        handle.write('{"round": 2, "test_acc')  # a run killed while appending its round
    assert main(["compare", str(tmp_path / "a"), str(tmp_path / "b")]) == 2
    assert "metrics.jsonl line 2 is not JSON" in capsys.readouterr().err


def test_the_same_command_twice_retraces_every_round(tmp_path, capsys):
    args = ["run", "--c_rounds", "2", "--num_clients", "3", "--model_width", "8", "--compile", "off",
            "--use_quantization", "--quantization_bits", "8", "--moving_average", "--quiet"]
    assert main([*args, "--out", str(tmp_path / "first")]) == 0
    assert main([*args, "--out", str(tmp_path / "second")]) == 0
    capsys.readouterr()
    assert main(["compare", str(tmp_path / "first"), str(tmp_path / "second")]) == 0
    assert "identical in all fields but timings: 2 of 2" in capsys.readouterr().out
