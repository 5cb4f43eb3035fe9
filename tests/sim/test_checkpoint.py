"""Crash-safe checkpoints and exact resume (SIGKILL, SIGTERM, refused config changes)."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from lptfl.cli import main
from lptfl.experiment import results
from lptfl.experiment.config import RunConfig
from lptfl.experiment.run_dir import OutputExistsError, RunDirectory, atomic_write
from lptfl.experiment import checkpoint as ckpt
from lptfl.sim import runner
from lptfl.sim.runner import run_experiment

ROUNDS = 6
ARGS = ["--compile", "off", "--model_width", "8", "--c_rounds", str(ROUNDS), "--num_clients", "4", "--frac", "0.5",
        "--quiet"]
TIMINGS = ("round_time_s", "wall_time_s", "phase_s")
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}  # 2 shared cores: no thread oversubscription


@pytest.fixture(autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def start(*args):
    return subprocess.Popen([sys.executable, "-m", "lptfl", "run", *args], env=ENV,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def complete_lines(path):
    try:
        return path.read_bytes().count(b"\n")
    except FileNotFoundError:
        return 0


def signal_after_lines(targets, timeout=240):
    """Watch every process at once and send each its signal as soon as its metrics file has the given
    number of complete lines. targets: name -> (process, metrics path, lines, signal)."""
    pending = dict(targets)
    deadline = time.monotonic() + timeout
    while pending:
        for name, (process, path, lines, signum) in list(pending.items()):
            if complete_lines(path) >= lines:
                process.send_signal(signum)
                del pending[name]
            else:
                assert process.poll() is None, (name, process.communicate())
        assert time.monotonic() < deadline, f"{sorted(pending)} did not reach their lines"
        time.sleep(0.01)


def rounds_without_timings(run_dir):
    lines = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in line.items() if k not in TIMINGS} for line in lines]


def assert_same_final_state(a, b):
    """The two runs' checkpoints hold the same round, clients and tensors (server, algorithm, store)."""
    left, right = ckpt.load_checkpoint(a), ckpt.load_checkpoint(b)
    assert (left.round, left.clients) == (right.round, right.clients)
    for part, state in left.state.items():
        assert sorted(state) == sorted(right.state[part]), part
        for name, value in state.items():
            assert torch.equal(value, right.state[part][name]), (part, name)


@pytest.fixture(scope="module")
def interrupted(tmp_path_factory):
    """CLI subprocesses: one SIGKILLed after round 2's line, one SIGTERMed after round 1's (run together);
    then the uninterrupted reference, in this process (it has torch imported already)."""
    base = tmp_path_factory.mktemp("runs")
    dirs = {name: base / name for name in ("reference", "killed", "terminated")}
    procs = {name: start(*ARGS, "--out", str(dirs[name])) for name in ("killed", "terminated")}
    signal_after_lines({"terminated": (procs["terminated"], dirs["terminated"] / "metrics.jsonl", 1, signal.SIGTERM),
                        "killed": (procs["killed"], dirs["killed"] / "metrics.jsonl", 2, signal.SIGKILL)})
    results = {name: (p.wait(timeout=300), *p.communicate()) for name, p in procs.items()}
    assert results["killed"][0] == -signal.SIGKILL
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        assert main(["run", *ARGS, "--out", str(dirs["reference"])]) == 0
    finally:
        torch.set_num_threads(threads)
    return dirs, results


def test_sigkilled_run_resumes_to_the_same_metrics_and_model(interrupted):
    dirs, _ = interrupted
    assert not (dirs["killed"] / "summary.json").exists()
    resumed = subprocess.run([sys.executable, "-m", "lptfl", "run", "--resume", str(dirs["killed"]), "--quiet"],
                             env=ENV, capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr  # a fresh process: nothing carried over in memory
    assert rounds_without_timings(dirs["killed"]) == rounds_without_timings(dirs["reference"])
    assert_same_final_state(dirs["killed"], dirs["reference"])
    summary = json.loads((dirs["killed"] / "summary.json").read_text())
    assert summary["rounds"] == ROUNDS


def test_sigterm_finishes_the_round_checkpoints_and_resumes_exactly(interrupted):
    dirs, results = interrupted
    rc, _, stderr = results["terminated"]
    assert rc == 128 + signal.SIGTERM, stderr
    assert "SIGTERM" in stderr and "--resume" in stderr
    lines = complete_lines(dirs["terminated"] / "metrics.jsonl")
    saved = ckpt.load_checkpoint(dirs["terminated"])
    assert 1 <= lines < ROUNDS and saved.round == saved.metrics_lines == lines
    assert (dirs["terminated"] / "metrics.jsonl").read_bytes().endswith(b"\n")
    partial = json.loads((dirs["terminated"] / "summary.json").read_text())  # the rounds so far, for tables
    assert partial["rounds"] == lines < partial["config"]["c_rounds"] and partial["machine"]["device"] == "cpu"
    assert main(["run", "--resume", str(dirs["terminated"]), "--quiet"]) == 0  # in-process this time
    assert rounds_without_timings(dirs["terminated"]) == rounds_without_timings(dirs["reference"])
    assert_same_final_state(dirs["terminated"], dirs["reference"])


def test_crash_between_metrics_and_checkpoint_reruns_the_round(tmp_path, monkeypatch):
    """Round 2's line is written, its checkpoint is not, and a half line follows: resume cuts both
    and runs round 2 again; the disk client-state store is rolled back to its snapshot."""
    options = dict(compile="off", model_width=4, num_clients=3, frac=1.0, c_rounds=2, moving_average=True)
    run_experiment(RunConfig(**options), tmp_path / "reference", progress=False)
    crashed = tmp_path / "crashed"
    real_save = ckpt.save_checkpoint

    def save_then_crash(out_dir, sim, *, metrics_lines):
        if sim.round == 2:
            with open(out_dir / "metrics.jsonl", "ab") as handle:
                handle.write(b'{"round": 3, "trai')
            raise SystemExit("simulated crash")
        return real_save(out_dir, sim, metrics_lines=metrics_lines)

    monkeypatch.setattr(runner, "save_checkpoint", save_then_crash)
    with pytest.raises(SystemExit):
        run_experiment(RunConfig(client_state="disk", **options), crashed, progress=False)
    assert complete_lines(crashed / "metrics.jsonl") == 2
    assert ckpt.load_checkpoint(crashed).round == 1
    monkeypatch.setattr(runner, "save_checkpoint", real_save)
    config = ckpt.resume_config(crashed, {})
    assert config.client_state == "disk"
    run_experiment(config, crashed, progress=False, resume=True)
    assert rounds_without_timings(crashed) == rounds_without_timings(tmp_path / "reference")
    final, reference = ckpt.load_checkpoint(crashed), ckpt.load_checkpoint(tmp_path / "reference")
    assert any(name.startswith("average.") for name in reference.state["server"])
    for name, value in reference.state["server"].items():
        assert torch.equal(final.state["server"][name], value), name
    assert final.client_mode == "disk" and final.clients == reference.clients == [0, 1, 2]
    assert reference.client_mode == "memory" and not final.state["store"]
    snapshots = list(crashed.glob(ckpt.SNAPSHOT_PREFIX + "*"))
    assert len(snapshots) == 1 and snapshots[0].name == final.snapshot


def test_a_resume_stopped_or_failing_while_set_up_keeps_the_summary(tmp_path, monkeypatch):
    """A stop signal that lands while a resumed run is still being set up (a grid stopped just as a
    run's turn starts) ends it before any round with the summary and curves of the rounds so far; a
    resume that fails to set up leaves them untouched."""
    run_dir = tmp_path / "run"
    options = dict(compile="off", model_width=4, num_clients=3, frac=1.0, c_rounds=3)
    run_experiment(RunConfig(**options), run_dir, progress=False, stop_after=1)
    before = json.loads((run_dir / "summary.json").read_text())
    real_simulation = runner.Simulation

    def failing_simulation(config, out_dir):
        raise RuntimeError("simulated set-up failure")

    monkeypatch.setattr(runner, "Simulation", failing_simulation)
    with pytest.raises(RuntimeError, match="set-up failure"):
        run_experiment(ckpt.resume_config(run_dir, {}), run_dir, progress=False, resume=True)
    assert json.loads((run_dir / "summary.json").read_text()) == before and (run_dir / "curves.png").exists()

    def signalled_simulation(config, out_dir):
        signal.raise_signal(signal.SIGINT)
        return real_simulation(config, out_dir)

    monkeypatch.setattr(runner, "Simulation", signalled_simulation)
    with pytest.raises(runner.RunInterrupted, match="after round 1"):
        run_experiment(ckpt.resume_config(run_dir, {}), run_dir, progress=False, resume=True)
    after = json.loads((run_dir / "summary.json").read_text())
    assert after["rounds"] == 1 and after["final_accuracy_mean"] == before["final_accuracy_mean"]
    assert (run_dir / "curves.png").exists() and complete_lines(run_dir / "metrics.jsonl") == 1
    assert ckpt.load_checkpoint(run_dir).round == 1
    monkeypatch.setattr(runner, "Simulation", real_simulation)
    assert run_experiment(ckpt.resume_config(run_dir, {}), run_dir, progress=False, resume=True)["rounds"] == 3


def test_resume_refuses_to_restart_a_run_whose_checkpoint_is_lost(tmp_path, capsys):
    """Rounds beyond the first checkpoint and no checkpoint: the file was lost (a fresh clone), and
    resuming would silently restart from round 0; before the first checkpoint, restarting is right."""
    run_dir = tmp_path / "run"
    options = dict(compile="off", model_width=4, num_clients=3, frac=1.0, c_rounds=3, checkpoint_every=1)
    run_experiment(RunConfig(**options), run_dir, progress=False, stop_after=2)
    (run_dir / ckpt.CHECKPOINT).unlink()
    metrics, first_two = (run_dir / "metrics.jsonl").read_bytes(), rounds_without_timings(run_dir)
    assert main(["run", "--resume", str(run_dir), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert "has 2 rounds but checkpoint.safetensors is missing" in err and "every 1 round" in err
    assert (run_dir / "metrics.jsonl").read_bytes() == metrics and (run_dir / "summary.json").exists()
    (run_dir / "metrics.jsonl").write_bytes(metrics.split(b"\n")[0] + b"\n")  # killed before round 1's checkpoint
    assert run_experiment(ckpt.resume_config(run_dir, {}), run_dir, progress=False, resume=True)["rounds"] == 3
    assert rounds_without_timings(run_dir)[:2] == first_two  # the restart ran the same rounds again


def test_resume_warns_when_the_numerics_change(tmp_path, caplog):
    """The checkpoint records torch, device, processor and threads; resuming under another record
    (here 2 threads after 1: a convolution's sums split differently) warns that the rounds from
    there are no longer bit-identical to an uninterrupted run's; the same record resumes silently."""
    run_dir = tmp_path / "run"
    options = dict(compile="off", model_width=4, num_clients=3, frac=1.0, c_rounds=3)
    run_experiment(RunConfig(**options), run_dir, progress=False, stop_after=1)
    recorded = ckpt.load_checkpoint(run_dir).numerics
    assert recorded == results.numerics("cpu") and recorded["threads"] == 1
    with caplog.at_level("WARNING", logger="lptfl.sim.runner"):
        run_experiment(ckpt.resume_config(run_dir, {}), run_dir, progress=False, resume=True, stop_after=2)
    assert "numerics" not in caplog.text
    torch.set_num_threads(2)
    with caplog.at_level("WARNING", logger="lptfl.sim.runner"):
        run_experiment(ckpt.resume_config(run_dir, {}), run_dir, progress=False, resume=True)
    assert "other numerics than the checkpointed rounds (threads 1 -> 2)" in caplog.text
    assert ckpt.load_checkpoint(run_dir).numerics["threads"] == 2
    caplog.clear()
    with caplog.at_level("WARNING", logger="lptfl.sim.runner"):
        run_experiment(ckpt.resume_config(run_dir, {}), run_dir, progress=False, resume=True)
    assert "has its 3 rounds already; nothing to run" in caplog.text
    assert results.numerics_changes({"threads": 1}, {"threads": 1, "torch": "2.13.0"}) == []  # older records


def test_resume_refuses_changed_settings(tmp_path, capsys):
    ckpt.write_config(tmp_path, RunConfig(c_rounds=4, seed=3, lr_schedule="cosine"))
    assert main(["run", "--resume", str(tmp_path), "--c_rounds", "9", "--seed", "3"]) == 2
    err = capsys.readouterr().err  # the cosine schedule depends on the number of rounds
    assert "refusing to resume" in err and "--c_rounds 4 -> 9" in err and "--seed" not in err
    allowed = ckpt.resume_config(tmp_path, {"checkpoint_every": 3, "compile": "off", "seed": 3})
    assert allowed.c_rounds == 4 and allowed.checkpoint_every == 3 and allowed.compile == "off"
    ckpt.write_config(tmp_path, RunConfig(c_rounds=4, seed=3))
    assert ckpt.resume_config(tmp_path, {"c_rounds": 9}).c_rounds == 9  # constant lr: a run can be extended
    with pytest.raises(ckpt.CheckpointError, match="dropout"):
        ckpt.resume_config(tmp_path, {"dropout": 0.2})
    assert main(["run", "--resume", str(tmp_path / "nothing")]) == 2
    assert "config.json" in capsys.readouterr().err


def test_a_started_run_is_not_overwritten_silently(tmp_path):
    """A folder with a run is refused without --overwrite; with it, the files of a run that wrote no
    round go (nothing to keep), so a failing replacement leaves no lone config to be refused on."""
    ckpt.write_config(tmp_path, RunConfig())
    with pytest.raises(OutputExistsError, match="--resume"):
        RunDirectory(tmp_path).prepare(overwrite=False)
    RunDirectory(tmp_path).prepare(overwrite=True)
    assert not (tmp_path / ckpt.CONFIG).exists() and not (tmp_path / ".replaced").exists()


def test_checkpoint_files_are_safe_and_atomic(tmp_path):
    atomic_write(tmp_path / "x.bin", b"old")
    atomic_write(tmp_path / "x.bin", b"new")
    assert (tmp_path / "x.bin").read_bytes() == b"new" and sorted(p.name for p in tmp_path.iterdir()) == ["x.bin"]
    (tmp_path / ckpt.CHECKPOINT).write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{}      ")
    with pytest.raises(ckpt.CheckpointError):
        ckpt.load_checkpoint(tmp_path)
    run = RunDirectory(tmp_path)
    (tmp_path / "metrics.jsonl").write_bytes(b'{"round": 1}\n{"round": 2}\n{"rou')
    run.truncate_metrics(1)
    assert (tmp_path / "metrics.jsonl").read_bytes() == b'{"round": 1}\n'
    with pytest.raises(ckpt.CheckpointError, match="has 1 complete lines; the checkpoint counts 3"):
        run.truncate_metrics(3)
    run.write_summary({"rounds": 1})
    assert json.loads((tmp_path / "summary.json").read_text()) == {"rounds": 1}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint.safetensors", "metrics.jsonl", "summary.json",
                                                          "x.bin"]


def test_algorithm_state_survives_a_checkpoint(tmp_path):
    """Server-optimizer momentum and FedBN's per-client state are part of the checkpoint."""
    from lptfl.experiment.config import RunConfig
    from lptfl.experiment.checkpoint import (
        load_checkpoint,
        restore_run,
        save_checkpoint,
    )
    from lptfl.sim.engine import Simulation

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        config = RunConfig(c_rounds=2, compile="off", model_width=8, num_clients=3, frac=1.0,
                           aggregation_mode="fedbn", model_norm="batchnorm",
                           server_optimizer="fedavgm", server_momentum=0.9)
        straight = Simulation(config)
        straight.run_round()
        save_checkpoint(tmp_path, straight, metrics_lines=1)
        expected = straight.run_round()
        resumed = Simulation(config)  # a fresh object: every client's batch norm comes from the checkpoint
        restore_run(resumed, load_checkpoint(tmp_path))
        got = resumed.run_round()
        assert got.vote_accuracy is not None
        assert (got.test_loss, got.vote_accuracy) == (expected.test_loss, expected.vote_accuracy)
        for name, value in straight.server.global_state.items():
            assert torch.equal(value, resumed.server.global_state[name]), name
        state = resumed.algorithm.state_dict()
        assert {k.split(".")[0] for k in state} == {"bn"}
        for name, value in straight.algorithm.state_dict().items():
            assert torch.equal(value, state[name]), name
        server = resumed.server.state_dict()  # the server optimizer's momentum is the server's
        assert any(name.startswith("optimizer.m.") for name in server)
        for name, value in straight.server.state_dict().items():
            assert torch.equal(value, server[name]), name
    finally:
        torch.set_num_threads(threads)


def test_stop_after_pauses_with_a_checkpoint_and_resume_continues_exactly(interrupted, tmp_path, capsys):
    dirs, _ = interrupted
    paused = tmp_path / "paused"
    assert main(["run", *ARGS, "--out", str(paused), "--checkpoint_every", "0", "--stop_after", "2"]) == 0
    assert f"paused after round 2 of {ROUNDS}" in capsys.readouterr().out
    summary = json.loads((paused / "summary.json").read_text())
    assert summary["rounds"] == 2 and summary["config"]["c_rounds"] == ROUNDS
    assert ckpt.load_checkpoint(paused).round == 2  # saved although --checkpoint_every 0: it is for resuming
    assert main(["run", "--resume", str(paused), "--stop_after", "2", "--quiet"]) == 0  # reached already
    assert complete_lines(paused / "metrics.jsonl") == 2
    assert main(["run", "--resume", str(paused), "--quiet"]) == 0
    assert rounds_without_timings(paused) == rounds_without_timings(dirs["reference"])
    with pytest.raises(ValueError, match="stop_after"):
        run_experiment(RunConfig(compile="off"), tmp_path / "bad", progress=False, stop_after=0)


def test_overwrite_keeps_the_old_run_until_the_new_one_writes_round_1(tmp_path, monkeypatch):
    """--overwrite sets the old run aside; a new run that fails or is stopped before round 1 puts it
    back untouched, and one that writes round 1 removes it."""
    run_dir = tmp_path / "run"
    options = dict(compile="off", model_width=4, num_clients=3, frac=1.0, c_rounds=1)
    run_experiment(RunConfig(**options), run_dir, progress=False)
    old = {path.name: path.read_bytes() for path in run_dir.iterdir() if path.is_file()}
    real_simulation = runner.Simulation

    def failing_simulation(config, out_dir):
        raise RuntimeError("simulated set-up failure")

    def signalled_simulation(config, out_dir):
        signal.raise_signal(signal.SIGTERM)
        return real_simulation(config, out_dir)

    monkeypatch.setattr(runner, "Simulation", failing_simulation)
    with pytest.raises(RuntimeError, match="set-up failure"):
        run_experiment(RunConfig(**options, seed=1), run_dir, progress=False, overwrite=True)
    assert {path.name: path.read_bytes() for path in run_dir.iterdir()} == old
    monkeypatch.setattr(runner, "Simulation", signalled_simulation)
    with pytest.raises(runner.RunInterrupted, match="SIGTERM before round 1 .nothing to keep"):
        run_experiment(RunConfig(**options, seed=1), run_dir, progress=False, overwrite=True)
    assert {path.name: path.read_bytes() for path in run_dir.iterdir()} == old
    monkeypatch.setattr(runner, "Simulation", real_simulation)
    run_experiment(RunConfig(**options, seed=1), run_dir, progress=False, overwrite=True)
    assert ckpt.read_config(run_dir).seed == 1 and not (run_dir / ".replaced").exists()
    assert (run_dir / "metrics.jsonl").read_bytes() != old["metrics.jsonl"]


def old_run(folder):
    ckpt.write_config(folder, RunConfig(seed=5))
    (folder / "metrics.jsonl").write_text('{"round": 1}\n')
    (folder / "client_state").mkdir()
    (folder / "client_state" / "0.npz").write_bytes(b"adam")


def is_old_run(folder):
    return (ckpt.read_config(folder).seed == 5 and (folder / "metrics.jsonl").read_text() == '{"round": 1}\n'
            and (folder / "client_state" / "0.npz").read_bytes() == b"adam"
            and not (folder / ".replaced").exists() and not (folder / ".replaced.tmp").exists())


def test_a_replacement_killed_before_round_1_leaves_the_old_run_to_put_back(tmp_path):
    """A replacement killed before round 1 (SIGKILL: nothing ran its clean-up) leaves the old run in
    .replaced/: another replacement keeps it there (and abandoning that one puts it back), and a new
    run without --overwrite finds it back in place and is refused."""
    old_run(tmp_path)
    RunDirectory(tmp_path).prepare(overwrite=True)
    ckpt.write_config(tmp_path, RunConfig(seed=6))  # the killed replacement's config
    RunDirectory(tmp_path).prepare(overwrite=True)
    assert not (tmp_path / ckpt.CONFIG).exists() and (tmp_path / ".replaced" / "metrics.jsonl").exists()
    ckpt.write_config(tmp_path, RunConfig(seed=7))
    RunDirectory(tmp_path).abandon()
    assert is_old_run(tmp_path)
    RunDirectory(tmp_path).prepare(overwrite=True)
    ckpt.write_config(tmp_path, RunConfig(seed=6))
    with pytest.raises(OutputExistsError, match="already holds a run"):
        RunDirectory(tmp_path).prepare(overwrite=False)
    assert is_old_run(tmp_path)


@pytest.mark.parametrize("failing_move", [1, 2, 3])
def test_a_crash_while_the_old_run_moves_loses_nothing(tmp_path, monkeypatch, failing_move):
    """Killed half-way through setting the old run aside or putting it back: the next process that
    takes the folder finishes the move back, and the old run is whole."""
    real_replace, calls = os.replace, []

    def crashing_replace(source, target):
        calls.append(source)
        if len(calls) == failing_move:
            raise KeyboardInterrupt("killed")
        real_replace(source, target)

    old_run(tmp_path)
    monkeypatch.setattr(os, "replace", crashing_replace)
    with pytest.raises(KeyboardInterrupt):
        RunDirectory(tmp_path).prepare(overwrite=True)
    monkeypatch.setattr(os, "replace", real_replace)
    with RunDirectory(tmp_path).locked():
        assert is_old_run(tmp_path)
    RunDirectory(tmp_path).prepare(overwrite=True)
    ckpt.write_config(tmp_path, RunConfig(seed=6))
    calls.clear()
    monkeypatch.setattr(os, "replace", crashing_replace)
    with pytest.raises(KeyboardInterrupt):
        RunDirectory(tmp_path).abandon()
    monkeypatch.setattr(os, "replace", real_replace)
    RunDirectory(tmp_path).abandon()
    assert is_old_run(tmp_path)


def test_resume_refuses_a_run_without_checkpoints_and_fewer_rounds_than_done(tmp_path, capsys):
    """--checkpoint_every 0 writes no checkpoint, so a resume would restart from round 0 and cut the
    rounds done; --c_rounds below the rounds done would leave a config that contradicts the metrics."""
    run_dir = tmp_path / "run"
    options = dict(compile="off", model_width=4, num_clients=3, frac=1.0, c_rounds=2)
    run_experiment(RunConfig(**options, checkpoint_every=0), run_dir, progress=False)
    metrics = (run_dir / "metrics.jsonl").read_bytes()
    assert main(["run", "--resume", str(run_dir), "--c_rounds", "3", "--quiet"]) == 2
    assert "--checkpoint_every 0, which writes none" in capsys.readouterr().err
    assert (run_dir / "metrics.jsonl").read_bytes() == metrics
    other = tmp_path / "other"
    run_experiment(RunConfig(**options), other, progress=False)
    assert main(["run", "--resume", str(other), "--c_rounds", "1", "--quiet"]) == 2
    assert "--c_rounds 1 is below the 2 rounds" in capsys.readouterr().err
    assert ckpt.read_config(other).c_rounds == 2
