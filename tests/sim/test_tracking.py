"""``--log tensorboard`` / ``--log wandb``: each round's metrics, the config and the curves reach the
tracker, read back from its files offline; a missing package is a one-line error."""

from __future__ import annotations

import builtins
import json
from pathlib import Path

import pytest

from lptfl.cli import main
from lptfl.experiment.config import RunConfig
from lptfl.experiment.results import read_metrics
from lptfl.experiment.tracking import TrackerError, check_tracker
from lptfl.sim.runner import run_experiment

TINY = dict(c_rounds=2, num_clients=4, frac=0.5, model_width=8, compile="off")


def test_tensorboard_receives_every_round_the_config_and_the_curves(tmp_path: Path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out = tmp_path / "run"
    run_experiment(RunConfig(log="tensorboard", **TINY), out, progress=False)
    events = EventAccumulator(str(out / "tensorboard"), size_guidance={"images": 0, "scalars": 0, "tensors": 0})
    events.Reload()
    rounds = read_metrics(out)
    accuracy = events.Scalars("test_accuracy")
    assert [e.step for e in accuracy] == [1, 2]
    assert [e.value for e in accuracy] == pytest.approx([r["test_accuracy"] for r in rounds])
    assert [e.value for e in events.Scalars("bytes_up")] == [r["bytes_up"] for r in rounds]
    assert "config" in " ".join(events.Tags()["tensors"])
    assert events.Tags()["images"] == ["curves"]


def test_wandb_offline_run_holds_the_rounds_and_the_curves(tmp_path: Path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    out = tmp_path / "run"
    run_experiment(RunConfig(log="wandb", **TINY), out, progress=False)
    runs = list((out / "wandb").glob("offline-run-*"))
    assert len(runs) == 1
    records = next(runs[0].glob("*.wandb")).read_bytes()
    for row in read_metrics(out):
        assert json.dumps(row["test_accuracy"]).encode() in records
    assert b"test_accuracy" in records and b"moving_weight" in records  # metrics and config
    assert list((runs[0] / "files" / "media" / "images").glob("curves_*.png"))


def test_a_missing_tracker_package_is_a_one_line_error(tmp_path: Path, monkeypatch, capsys):
    real_import = builtins.__import__

    def no_wandb(name, *args, **kwargs):
        if name == "wandb" or name.startswith("wandb."):
            raise ImportError("No module named 'wandb'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_wandb)
    monkeypatch.setattr("importlib.import_module", lambda name: no_wandb(name))
    with pytest.raises(TrackerError, match=r"pip install 'lptfl\[wandb\]'"):
        check_tracker("wandb")
    out = tmp_path / "run"
    code = main(["run", "--c_rounds", "1", "--log", "wandb", "--out", str(out), "--quiet"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and err == ["lptfl: error: --log wandb needs the wandb package: pip install 'lptfl[wandb]'"]
    assert not out.exists()


def test_wandb_that_cannot_start_is_a_one_line_error_and_leaves_no_run(tmp_path: Path, monkeypatch, capsys):
    """No API key (wandb's UsageError) is the user's set-up, not a bug: one line saying what to do."""
    import wandb

    def no_login(**kwargs):
        raise wandb.errors.UsageError("No API key configured. Use `wandb login` to log in.")

    monkeypatch.setattr(wandb, "init", no_login)
    out = tmp_path / "run"
    code = main(["run", "--c_rounds", "1", "--log", "wandb", "--out", str(out), "--quiet", "--num_clients", "4",
                 "--model_width", "8", "--compile", "off"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and err[0].startswith("lptfl: error: --log wandb cannot start: No API key")
    assert "WANDB_MODE=offline" in err[0] and not out.exists()
