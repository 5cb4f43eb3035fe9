"""Flower engines beyond the loopback Deployment Engine of ``test_flower_local.py``:

* the Simulation Engine (Ray): ``flwr run .`` on the repository's app, with a connection whose
  ``options.num-supernodes = 2`` (the simulated SuperNodes get ``partition-id``/``num-partitions``
  from Flower itself);
* SuperNode authentication: a TLS SuperLink with ``--enable-supernode-auth``, one registered
  SuperNode that completes a round, and one unregistered SuperNode that is refused.
"""

from __future__ import annotations

import json
import subprocess
import time
from pathlib import Path

import pytest

from lptfl.experiment.results import read_metrics
from lptfl.flower.local import (
    FEDERATION,
    LocalFederation,
    _signal_group,
    _tool,
    flower_env,
    free_ports,
    make_certificates,
    make_supernode_key,
)

REPO = Path(__file__).resolve().parents[2]
TINY = "model-width=8 compile='off' batch-size=64 frac=1.0"


def _flwr(env: dict, cwd: Path, *args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([_tool("flwr"), *args], env=env, cwd=cwd, capture_output=True, text=True,
                          timeout=timeout, stdin=subprocess.DEVNULL)


def _json(text: str) -> dict:
    try:
        value = json.loads(text)
    except json.JSONDecodeError:
        return {}
    return value if isinstance(value, dict) else {}


def _run_status(env: dict, cwd: Path, connection: str, run_id: str) -> dict:
    done = _flwr(env, cwd, "ls", connection, "--run-id", run_id, "--format", "json", timeout=60)
    try:
        runs = json.loads(done.stdout).get("runs") or []
    except json.JSONDecodeError:
        return {}
    return runs[0] if runs else {}


@pytest.mark.slow
def test_simulation_engine_two_rounds(tmp_path: Path):
    """``flwr run . local-sim`` on the Simulation Engine with 2 simulated SuperNodes."""
    home, out = tmp_path / "home", tmp_path / "out"
    home.mkdir()
    env = flower_env(home, processes=2)
    port = free_ports(1)[0]
    (home / "config.toml").write_text(
        '[superlink]\ndefault = "local-sim"\n\n[superlink.local-sim]\n'
        f'address = "127.0.0.1:{port}"\ninsecure = true\n'
        "options.num-supernodes = 2\noptions.backend.client-resources.num-cpus = 1\n",
        encoding="utf-8",
    )
    log_file = open(home / "superlink.log", "wb")  # noqa: SIM115
    superlink = subprocess.Popen(
        [_tool("flower-superlink"), "--insecure", "--simulation", "--host", "127.0.0.1", "--port", str(port)],
        env=env, cwd=home, stdout=log_file, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
        start_new_session=True,
    )
    log_file.close()
    try:
        done = None
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:  # the Control API answers once the SuperLink is up
            assert superlink.poll() is None, (home / "superlink.log").read_text()
            done = _flwr(env, REPO, "run", ".", "local-sim", "--format", "json",
                         "-c", f"c-rounds=2 min-nodes=2 {TINY} out-dir='{out}'")
            if _json(done.stdout).get("success"):
                break
            time.sleep(1)
        reply = _json(done.stdout)
        assert reply.get("success"), done.stdout + done.stderr
        run_id = reply["run-id"]
        deadline = time.monotonic() + 400
        while not str((entry := _run_status(env, REPO, "local-sim", run_id)).get("status", "")).startswith("finished:"):
            assert superlink.poll() is None, (home / "superlink.log").read_text()[-3000:]
            assert time.monotonic() < deadline, f"run {run_id} did not finish: {entry}"
            time.sleep(2)
        assert entry["status"] == "finished:completed", entry
    finally:
        _signal_group(superlink, 15)
        try:
            superlink.wait(timeout=20)
        except subprocess.TimeoutExpired:
            pass
        _signal_group(superlink, 9)
        if superlink.poll() is None:
            superlink.wait()
    rounds = read_metrics(out)
    assert [r["round"] for r in rounds] == [1, 2]
    for r in rounds:
        assert r["clients"] == [0, 1] and r["accepted"] == 2  # partition-id 0 and 1 from the simulation
        assert r["bytes_up"] > 0 and r["bytes_down"] > 0
    first, last = rounds
    assert last["test_loss"] < first["test_loss"] and last["test_accuracy"] > first["test_accuracy"], rounds
    assert json.loads((out / "summary.json").read_text())["rounds"] == 2


@pytest.mark.slow
def test_supernode_authentication(tmp_path: Path):
    """A registered SuperNode completes a round; an unregistered one is refused."""
    from lptfl.experiment.config import RunConfig
    from lptfl.flower.config import FlowerOptions, to_flower_config
    from lptfl.flower.local import write_app

    keys = tmp_path / "keys"
    good, bad = make_supernode_key(keys, "node-0"), make_supernode_key(keys, "intruder")
    tls = make_certificates(tmp_path / "certs")
    out = tmp_path / "out"
    config = RunConfig(dataset="digits", model_width=8, frac=1.0, batch_size=64, compile="off", c_rounds=1,
                       num_clients=2)
    options = FlowerOptions(out_dir=str(out), min_nodes=1, round_timeout=300)
    with LocalFederation(1, home=tmp_path / "home", tls=tls, supernode_keys=[good]) as federation:
        intruder_port = free_ports(1)[0]
        intruder = federation._spawn("intruder", [
            _tool("flower-supernode"), "--root-certificates", str(tls.ca_cert),
            "--superlink", f"127.0.0.1:{federation.superlink_port}", "--port", str(intruder_port),
            "--node-config", "partition-id=1 num-partitions=2", "--auth-supernode-private-key", str(bad),
        ])
        # the unregistered SuperNode is refused: it gives up and exits (Flower exit code 305)
        intruder.wait(timeout=120)  # TimeoutExpired if it got in (LocalFederation then stops it)
        federation.processes.remove(intruder)
        assert intruder.returncode not in (None, 0)
        assert "Failed to activate SuperNode" in federation.log_path("intruder").read_text(errors="replace")
        assert "No SuperNode found with the given public key" in federation.log_path("superlink").read_text(
            errors="replace")
        run_id = federation.submit(write_app(federation.home / "app", to_flower_config(config, options)))
        entry = federation.wait(run_id, timeout=400)
        assert entry["status"] == "finished:completed", entry
        listed = federation.flwr("supernode", "ls", FEDERATION, "--format", "json", timeout=60)
        nodes = json.loads(listed.stdout).get("nodes", [])
        assert len(nodes) == 1, listed.stdout  # only the registered SuperNode
    (r,) = read_metrics(out)
    assert r["accepted"] == 1 and r["clients"] == [0] and len(r["nodes"]) == 1
    assert r["bytes_up"] > 0
