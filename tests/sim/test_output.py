"""What a run shows and writes (issue 35, point 10): the final line, curves, `lptfl report --format`."""

import csv
import io
import json
import subprocess
import sys

import pytest
from matplotlib.ticker import MaxNLocator

from lptfl import report as report_module
from lptfl.cli import main

TINY = ["--num_clients", "2", "--model_width", "4", "--compile", "off", "--quiet"]


@pytest.fixture(scope="module")
def two_round_run(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("runs") / "two"
    assert main(["run", *TINY, "--c_rounds", "2", "--out", str(run_dir)]) == 0
    return run_dir


def test_the_final_line_names_the_rounds_it_averages_and_the_time_with_set_up(tmp_path, capsys):
    assert main(["run", *TINY, "--c_rounds", "2", "--out", str(tmp_path / "a")]) == 0
    line = capsys.readouterr().out.strip().splitlines()[-1]
    assert "(last 2 evaluated rounds;" in line and "s with set-up (" in line and " s in rounds)" in line
    total, rounds = line.split("; ")[-2].split(" s with set-up (")
    assert float(total) >= float(rounds.split(" s in rounds")[0])
    assert main(["run", *TINY, "--c_rounds", "1", "--out", str(tmp_path / "b")]) == 0
    assert "(the only evaluated round;" in capsys.readouterr().out


def test_a_one_round_curve_is_visible_and_rounds_are_integers(tmp_path, monkeypatch):
    assert main(["run", *TINY, "--c_rounds", "1", "--out", str(tmp_path / "one")]) == 0
    import matplotlib.pyplot as plt

    figures = []
    monkeypatch.setattr(plt, "close", figures.append)  # keep the figure to look at it
    report_module.plot_curves([tmp_path / "one"], tmp_path / "curves.png")
    accuracy_axis = figures[0].axes[0]
    (line,) = accuracy_axis.lines
    assert line.get_marker() == "o" and list(line.get_xdata()) == [1]
    assert isinstance(accuracy_axis.xaxis.get_major_locator(), MaxNLocator)
    assert all(float(t).is_integer() for t in accuracy_axis.get_xticks())
    assert (tmp_path / "curves.png").stat().st_size > 0


def test_report_formats(two_round_run, capsys):
    assert main(["report", str(two_round_run)]) == 0
    assert capsys.readouterr().out.startswith("| run | dataset |")
    assert main(["report", str(two_round_run), "--format", "csv"]) == 0
    rows = list(csv.DictReader(io.StringIO(capsys.readouterr().out)))
    assert len(rows) == 1 and rows[0]["run"] == "two" and rows[0]["rounds"] == "2" and float(rows[0]["mean"]) > 0
    assert main(["report", str(two_round_run), "--format", "json"]) == 0
    (row,) = json.loads(capsys.readouterr().out)
    assert row["rounds"] == 2 and len(row["curve"]) == 2 and row["dataset"] == "digits"
    with pytest.raises(SystemExit):
        main(["report", str(two_round_run), "--format", "xml"])
    assert "invalid choice: 'xml'" in capsys.readouterr().err


def test_report_reads_a_folder_of_runs(two_round_run, tmp_path, capsys):
    assert main(["report", str(two_round_run.parent), "--format", "csv"]) == 0  # the folder holding "two"
    assert [row["run"] for row in csv.DictReader(io.StringIO(capsys.readouterr().out))] == ["two"]
    (tmp_path / "empty").mkdir()
    assert main(["report", str(tmp_path / "empty")]) == 2
    assert capsys.readouterr().err == f"lptfl: error: no metrics.jsonl in {tmp_path / 'empty'}\n"


def test_json_report_writes_a_round_not_evaluated_as_null(tmp_path, capsys):
    run_dir = tmp_path / "sparse"
    assert main(["run", *TINY, "--c_rounds", "7", "--eval_every", "3", "--out", str(run_dir)]) == 0
    capsys.readouterr()
    assert main(["report", str(run_dir), "--format", "json"]) == 0
    curve = json.loads(capsys.readouterr().out)[0]["curve"]  # valid JSON: no NaN
    assert curve[0] is None and all(v is not None for v in curve[2:])


def test_flower_local_logs_each_round_as_it_is_written(tmp_path, caplog):
    from lptfl.flower.local import RoundProgress

    path = tmp_path / "metrics.jsonl"
    progress = RoundProgress(path, total=3)
    progress()  # no file yet: nothing
    row = {"round": 1, "test_accuracy": 0.5, "train_loss": 1.25, "round_time_s": 0.5}
    path.write_text(json.dumps(row) + "\n" + '{"round": 2, "tr')  # round 2 half written
    with caplog.at_level("INFO", logger="lptfl.flower.local"):
        progress()
        progress()
    assert caplog.text.count("round 1/3: test accuracy 0.5000, train loss 1.2500, 0.5 s") == 1
    assert "round 2/3" not in caplog.text


def test_flower_local_writes_config_json_and_removes_it_when_the_run_fails(tmp_path, monkeypatch, capsys):
    from lptfl.flower import local

    def failing_run(config, out_dir, **_):
        assert json.loads((out_dir / "config.json").read_text())["num_clients"] == 3  # written before the run
        raise local.FlowerRunError("simulated failure")

    monkeypatch.setattr(local, "run_local", failing_run)
    out = tmp_path / "flower"
    assert main(["flower-local", "--supernodes", "3", "--rounds", "1", "--out", str(out), "--quiet"]) == 1
    assert "simulated failure" in capsys.readouterr().err and not out.exists()


@pytest.mark.parametrize("failure, exit_code", [(SystemExit(143), 143), (ValueError("bad"), 2), (None, 1)])
def test_flower_local_over_a_run_puts_it_back_when_the_federation_fails_before_round_1(
        tmp_path, monkeypatch, capsys, failure, exit_code):
    """--overwrite over a finished run: the ServerApp sets its own folder up (it replaces what it finds),
    then the federation fails, is stopped (SIGTERM exits 143) or errs; the old run comes back whole,
    and a retry is not refused on a left-over config."""
    from lptfl.experiment.run_dir import RunDirectory
    from lptfl.flower import local

    out = tmp_path / "flower"
    assert main(["run", "--num_clients", "3", "--c_rounds", "1", "--model_width", "4", "--compile", "off",
                 "--out", str(out), "--quiet"]) == 0
    old = {path.name: path.read_bytes() for path in out.iterdir()}

    def failing_run(config, out_dir, **_):
        RunDirectory(out_dir).prepare(overwrite=True)  # as the ServerApp does before its first round
        raise failure or local.FlowerRunError("simulated failure")

    monkeypatch.setattr(local, "run_local", failing_run)
    try:
        code = main(["flower-local", "--supernodes", "3", "--rounds", "1", "--out", str(out), "--overwrite", "--quiet"])
    except SystemExit as stopped:
        code = stopped.code
    assert code == exit_code
    assert {path.name: path.read_bytes() for path in out.iterdir()} == old


def test_a_second_process_cannot_run_in_a_held_folder(tmp_path):
    """Two runs writing into one folder would interleave their metrics lines: the second is refused."""
    from lptfl.experiment.run_dir import OutputExistsError, RunDirectory

    out = tmp_path / "run"
    holder = subprocess.Popen([sys.executable, "-c", (
        "import sys, time; from lptfl.experiment.run_dir import RunDirectory\n"
        f"with RunDirectory({str(out)!r}).locked():\n"
        "    print('held', flush=True); time.sleep(60)\n")], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(OutputExistsError, match="in use by another lptfl process"):
            with RunDirectory(out).locked():
                pass
    finally:
        holder.kill()
        holder.wait()
    with RunDirectory(out).locked():  # released when its holder ends
        pass
