"""`lptfl report` and `lptfl compare` on damaged, empty or unusual run folders: one line naming the file
and what was expected, damaged runs among several skipped, the real plot path, labels and sub-runs."""

from __future__ import annotations

import json
import os

import pytest

from lptfl.cli import main
from lptfl.experiment.results import REPAIR
from lptfl.experiment.run_dir import CheckpointError, RunDirectory
from lptfl.report import plot_curves, run_label

ROUND = json.dumps({"round": 1, "test_accuracy": 0.5, "test_loss": 1.0, "bytes_up": 10})


def write_run(run_dir, metrics: str = ROUND + "\n", **files: str):
    """A run folder with ``metrics`` as its metrics.jsonl and ``files`` (name with . as _) beside it."""
    run_dir.mkdir(parents=True)
    (run_dir / "metrics.jsonl").write_text(metrics)
    for name, text in files.items():
        (run_dir / name.replace("_", ".")).write_text(text)
    return run_dir


def error_of(capsys, *argv: str) -> str:
    """The stderr of ``lptfl argv``, which must fail with exit status 2 in one ``lptfl: error:`` line."""
    assert main(list(argv)) == 2
    err = capsys.readouterr().err
    assert err.startswith("lptfl: error: ") and err.count("\n") == 1, err
    return err.removeprefix("lptfl: error: ").rstrip("\n")


@pytest.mark.parametrize("metrics, files, message", [
    (ROUND + "\n", {"summary_json": "{}"}, "summary.json holds {}, expected a JSON object with a config object"),
    (ROUND + "\n", {"summary_json": "{x"}, "summary.json is not JSON (Expecting property name enclosed in double "
                                           "quotes at line 1), expected lptfl's summary.json"),
    (ROUND + "\n", {"config_json": "[1]"}, "config.json holds [1], expected a JSON object"),
    (ROUND + "\n42\n", {}, f"metrics.jsonl line 2 is 42, expected a JSON object (one round); {REPAIR}"),
    ('{"round": 3}\n', {}, f"metrics.jsonl line 1 has no bytes_up, expected an integer >= 0; {REPAIR}"),
    ('{"round": "3", "bytes_up": 1}\n', {}, "metrics.jsonl line 1 has round '3', expected an integer >= 1"),
    ('{"round": 1, "bytes_up": 1, "test_loss": "low"}\n', {},
     "metrics.jsonl line 1 has test_loss 'low', expected a number or null"),
    ('{"round": 1, "tr\n' + ROUND + "\n", {}, f"metrics.jsonl line 1 is not JSON (Unterminated string starting at), "
                                              f"expected one object per round; {REPAIR}"),
], ids=["summary-without-config", "summary-not-json", "config-not-object", "line-not-object", "line-without-bytes",
        "round-a-string", "loss-a-string", "line-1-torn"])
def test_a_damaged_file_is_one_line_naming_it_and_what_was_expected(tmp_path, capsys, metrics, files, message):
    run = write_run(tmp_path / "run", metrics, **files)
    assert error_of(capsys, "report", str(run)).startswith(f"{run}/{message}")


def test_compare_names_a_line_that_is_no_round(tmp_path, capsys):
    good, bad = write_run(tmp_path / "good"), write_run(tmp_path / "bad", ROUND + "\n42\n")
    assert error_of(capsys, "compare", str(good), str(bad)).startswith(f"{bad}/metrics.jsonl line 2 is 42, expected")


def test_only_a_last_line_cut_short_is_advised_to_be_resumed(tmp_path, capsys):
    """Resuming cuts off an incomplete last line (no checkpoint counts it), not damage before it."""
    torn = write_run(tmp_path / "torn", '{"round": 1, "tr')
    assert error_of(capsys, "report", str(torn)).endswith(f"`lptfl run --resume {torn}` cuts it off")
    complete = write_run(tmp_path / "complete", '{"round": 1, "tr\n')
    assert error_of(capsys, "report", str(complete)).endswith(REPAIR)


def test_a_damaged_run_among_several_is_skipped_with_a_warning(tmp_path, capsys, caplog):
    write_run(tmp_path / "a-good")
    bad = write_run(tmp_path / "b-killed", ROUND + "\n42\n")
    write_run(tmp_path / "c-good")
    assert main(["report", str(tmp_path), "--format", "csv"]) == 1
    assert [line.split(",")[0] for line in capsys.readouterr().out.splitlines()] == ["run", "a-good", "c-good"]
    assert f"skipping {bad}: {bad}/metrics.jsonl line 2 is 42" in caplog.text


def test_plot_says_the_file_it_wrote_and_refuses_a_folder(tmp_path, capsys):
    run = write_run(tmp_path / "run")
    assert main(["report", str(run), "--plot", str(tmp_path / "myplot")]) == 0
    assert capsys.readouterr().out.endswith(f"curves saved to {tmp_path / 'myplot.png'}\n")
    assert (tmp_path / "myplot.png").stat().st_size > 0 and not (tmp_path / "myplot").exists()
    assert plot_curves([run], tmp_path / "curves.svg") == tmp_path / "curves.svg"  # a format matplotlib knows
    assert plot_curves([run], tmp_path / "curves.v1") == tmp_path / "curves.v1.png"
    (tmp_path / "cfgdir").mkdir()
    assert main(["report", str(run), "--plot", str(tmp_path / "cfgdir")]) == 2
    assert capsys.readouterr().err == (f"lptfl: error: {tmp_path / 'cfgdir'} is a folder, expected a file name "
                                       f"for the curves such as {tmp_path / 'cfgdir' / 'curves.png'}\n")
    assert not (tmp_path / "cfgdir.png").exists()


@pytest.mark.filterwarnings("error")  # matplotlib's "No artists with labels found to put in legend"
def test_a_run_in_the_working_folder_is_labelled_by_its_name(tmp_path, monkeypatch):
    run = write_run(tmp_path / "here")
    monkeypatch.chdir(run)
    assert run_label(".") == "here" and run_label(run / "..") == tmp_path.name
    plot_curves(["."], tmp_path / "curves.png")


def test_a_folder_holding_a_run_and_runs_reports_them_all(tmp_path, capsys):
    outer = write_run(tmp_path / "outer")
    write_run(outer / "inner")
    write_run(outer / ".replaced")  # a run set aside by --overwrite is no run of the folder
    assert main(["report", str(outer), "--format", "csv"]) == 0
    assert [line.split(",")[0] for line in capsys.readouterr().out.splitlines()] == ["run", "outer", "inner"]


def test_a_run_without_rounds_or_settings_says_so(tmp_path, capsys):
    run = write_run(tmp_path / "empty", "")
    assert main(["report", str(run)]) == 0
    assert capsys.readouterr().out.splitlines()[-1] == "| empty | ? | ? | ? | ? | 0 | - | ? | - | - | 0.00 |"
    (run / "config.json").write_text(json.dumps({"use_quantization": True, "quantization_bits": 8}))
    assert main(["report", str(run)]) == 0
    assert "| empty | ? | ? | w/o avg | 8 bit | 0 | - | policy act. |" in capsys.readouterr().out


def test_a_missing_metrics_file_the_checkpoint_counts_is_named(tmp_path):
    with pytest.raises(CheckpointError, match=f"^{tmp_path / 'metrics.jsonl'} is missing; the checkpoint counts 2;"):
        RunDirectory(tmp_path).checkpointed_rounds(2)
    assert os.listdir(tmp_path) == []
