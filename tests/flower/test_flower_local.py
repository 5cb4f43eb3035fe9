"""End to end on a real Flower federation: ``lptfl flower-local`` starts a SuperLink and two
SuperNodes on 127.0.0.1 (Deployment Engine), runs two rounds on digits, and stops them all."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from lptfl.experiment.results import read_metrics

SMALL = ["--dataset", "digits", "--model_width", "16", "--frac", "1.0", "--batch_size", "64", "--compile", "off"]


def flower_pids(home: Path) -> set[int]:
    """Processes started for the federation whose FLWR_HOME is ``home`` (they inherit it), so
    Flower processes of other runs on this machine are never counted."""
    marker = f"FLWR_HOME={Path(home).resolve()}".encode()
    found = set()
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit() or int(proc.name) == os.getpid():
            continue
        try:
            environ = (proc / "environ").read_bytes().split(b"\0")
        except OSError:  # gone, or not ours to read
            continue
        if marker in environ:
            found.add(int(proc.name))
    return found


def run_cli(args: list[str], timeout: float) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "lptfl", "flower-local", *args], capture_output=True, text=True, timeout=timeout,
        stdin=subprocess.DEVNULL,
    )


def assert_no_flower_processes(home: Path) -> None:
    """The command has returned: none of its processes may outlive it (2 s for the kernel to reap)."""
    deadline = time.monotonic() + 2
    while (left := flower_pids(home)) and time.monotonic() < deadline:
        time.sleep(0.5)
    assert not left, f"flower processes left running: {left}"


@pytest.mark.slow
@pytest.mark.parametrize("insecure", [False, True], ids=["tls-default", "insecure"])
def test_flower_local_two_rounds(tmp_path: Path, insecure: bool):
    """Two rounds on a local federation: with TLS unless --insecure is asked for."""
    out = tmp_path / "out"
    args = ["--supernodes", "2", "--rounds", "2", "--out", str(out), "--flwr-home", str(tmp_path / "home"), *SMALL]
    done = run_cli(args + (["--insecure"] if insecure else []), timeout=420)
    assert done.returncode == 0, done.stdout + done.stderr
    connection = (tmp_path / "home" / "config.toml").read_text()
    assert ("insecure = true" in connection) == insecure and ("root-certificates" in connection) != insecure
    assert ("without TLS" in done.stderr) == insecure, done.stderr
    rounds = read_metrics(out)
    assert [r["round"] for r in rounds] == [1, 2]
    for r in rounds:
        assert r["accepted"] == 2 and r["rejected"] == 0 and not r["skipped"]
        assert r["clients"] == [0, 1]
        assert r["bytes_up"] > 0 and r["bytes_down"] > 0 and len(r["bytes_up_per_client"]) == 2
    first, last = rounds
    assert last["test_loss"] < first["test_loss"] and last["test_accuracy"] > first["test_accuracy"], rounds
    assert [r["state_restored"] for r in rounds] == [0, 2]  # optimizer state kept on the SuperNodes
    summary = json.loads((out / "summary.json").read_text())
    assert summary["rounds"] == 2 and summary["driver"] == "flower"
    assert summary["bytes_up_total"] == sum(r["bytes_up"] for r in rounds)
    assert (out / "curves.png").exists()
    assert_no_flower_processes(tmp_path / "home")


def test_tls_is_the_default_and_needs_openssl(tmp_path: Path, monkeypatch):
    """Certificates unless --insecure; without openssl a one-line error that names --insecure."""
    from lptfl.flower.local import FlowerRunError, local_security

    tls = local_security(tmp_path / "certs", insecure=False)
    assert tls is not None and tls.ca_cert.exists() and tls.server_cert.exists() and tls.server_key.exists()
    assert local_security(tmp_path / "none", insecure=True) is None
    assert not (tmp_path / "none").exists()
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    with pytest.raises(FlowerRunError, match="install openssl, or pass --insecure"):
        local_security(tmp_path / "certs2", insecure=False)
    done = run_cli(["--out", str(tmp_path / "out"), "--flwr-home", str(tmp_path / "home"), *SMALL], timeout=120)
    assert done.returncode == 1 and "pass --insecure to run without TLS" in done.stderr, done.stderr
    assert not flower_pids(tmp_path / "home")


def test_flower_local_failure_is_reported_and_cleaned_up(tmp_path: Path):
    """A run that cannot work (a dataset that is not there) fails with exit 1, not 0,
    and leaves no process behind."""
    out = tmp_path / "out"
    args = ["--supernodes", "1", "--rounds", "1", "--out", str(out), "--flwr-home", str(tmp_path / "home"),
            "--dataset", "mnist", "--data_path", str(tmp_path / "no-data"), "--timeout", "240"]
    done = run_cli(args, timeout=300)
    assert done.returncode == 1, done.stdout + done.stderr
    assert "flower run failed" in done.stderr
    assert not (out / "summary.json").exists()
    assert_no_flower_processes(tmp_path / "home")


@pytest.mark.slow
def test_killed_supernode_is_counted_and_the_run_completes(tmp_path: Path):
    """SIGKILL one of two SuperNodes after round 1: round 2 waits ``round-timeout`` for it,
    counts it as missing (or as an error reply), aggregates the survivor's update, and the
    run completes."""
    import signal

    from lptfl.experiment.config import RunConfig
    from lptfl.flower.config import FlowerOptions, to_flower_config
    from lptfl.flower.local import LocalFederation, write_app

    out = tmp_path / "out"
    config = RunConfig(dataset="digits", model_width=16, frac=1.0, batch_size=64, compile="off", c_rounds=2, num_clients=2)
    # round 1 starts each ClientApp process cold (torch, data): on 2 loaded cores 20 s was too short
    options = FlowerOptions(out_dir=str(out), min_nodes=2, round_timeout=60)
    with LocalFederation(2, home=tmp_path / "home") as federation:
        run_id = federation.submit(write_app(federation.home / "app", to_flower_config(config, options)))
        deadline = time.monotonic() + 300
        while len(read_metrics(out)) < 1:
            assert time.monotonic() < deadline, "round 1 did not finish"
            federation.check_alive()
            time.sleep(0.5)
        victim = federation.processes[2]  # supernode-1 (processes: superlink, supernode-0, supernode-1)
        os.killpg(victim.pid, signal.SIGKILL)
        victim.wait()
        federation.processes.remove(victim)
        entry = federation.wait(run_id, timeout=400)
    assert entry["status"] == "finished:completed", entry
    r1, r2 = read_metrics(out)
    assert r1["accepted"] == 2
    assert r2["accepted"] == 1 and r2["failed"] == 1 and r2["missing"] + r2["errors"] == 1 and not r2["skipped"]
    assert r2["clients"] == [0]
    assert_no_flower_processes(tmp_path / "home")


@pytest.mark.parametrize("sig", ["SIGINT", "SIGTERM"])
def test_interrupt_stops_every_process(tmp_path: Path, sig: str):
    """Ctrl-C (or SIGTERM) while the federation runs: the command stops all it started. It is started
    with SIGINT ignored, as a shell starts a background job, and must stop on SIGINT all the same."""
    import signal

    home, metrics = tmp_path / "home", tmp_path / "out" / "metrics.jsonl"
    args = ["--supernodes", "2", "--rounds", "5", "--out", str(metrics.parent), "--flwr-home", str(home), *SMALL]
    ignoring_sigint = ["sh", "-c", 'trap "" INT; exec "$@"', "sh"]  # exec keeps the ignored disposition
    proc = subprocess.Popen([*ignoring_sigint, sys.executable, "-m", "lptfl", "flower-local", *args],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, stdin=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 240
        while not (metrics.exists() and b"\n" in metrics.read_bytes()):  # round 1 done: every kind of process is up
            assert proc.poll() is None, proc.communicate()
            assert time.monotonic() < deadline, "the federation did not finish round 1"
            time.sleep(0.2)
        assert flower_pids(home), "no flower process was running"
        proc.send_signal(getattr(signal, sig))
        _, err = proc.communicate(timeout=150)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode in (130, 143), err
    assert_no_flower_processes(tmp_path / "home")
