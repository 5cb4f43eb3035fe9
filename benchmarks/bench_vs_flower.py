"""One small job with ``lptfl run`` and on Flower's Simulation Engine: wall clock and accuracies side by side.

Run: ``python benchmarks/bench_vs_flower.py [--rounds 3] [--clients 3] [--json]``

The job: digits (embedded, no download), ``--clients`` clients all trained every round, ``--rounds``
rounds, 8-bit training with the server moving average (``--use_quantization --moving_average``),
every other setting at ``lptfl run``'s default. It runs twice, one after the other:

* ``lptfl run`` in a fresh process, with its default torch threads;
* lptfl's Flower app (``lptfl.flower.server_app`` / ``client_app``, the same RunConfig as its run
  config) on Flower's Simulation Engine: a ``flower-superlink --simulation`` on 127.0.0.1, a
  connection with ``options.num-supernodes = clients`` (simulated SuperNode ``i`` holds partition
  ``i``), ``flwr run``, then the ServerApp's ``summary.json`` and ``flwr ls`` saying
  ``finished:completed``. Ray gives each ClientApp ``--flower_cpus_per_client`` CPUs and runs as
  many at once as that leaves cores for; each Flower process gets ``OMP_NUM_THREADS`` = cores / that
  number (:func:`lptfl.flower.local.flower_env`), unless ``OMP_NUM_THREADS`` is set for both runs.

Each time is wall clock from launching the first process to the results being there, start-up
included (Python imports, Ray's start); Flower's tear-down after that is reported apart
(``flower_teardown_s``). The Flower app reproduces ``lptfl run`` round by round, so the per-round
``test_accuracy`` of the two ``metrics.jsonl`` must agree within ``--tolerance``. Other jobs on
the machine change both times a lot (``load_1min_before_after``: the 1-minute load average). The
last line is JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from lptfl.cli import build_parser, config_from_args
from lptfl.experiment.config import RunConfig
from lptfl.experiment.results import SUMMARY, read_metrics
from lptfl.flower.config import FlowerOptions, to_flower_config
from lptfl.flower.local import flower_env, free_ports, write_app

CONNECTION = "local-sim"


def job_flags(clients: int, rounds: int) -> list[str]:
    """The ``lptfl run`` flags of the job (without ``--out``)."""
    return ["--dataset", "digits", "--num_clients", str(clients), "--frac", "1.0", "--c_rounds", str(rounds),
            "--use_quantization", "--quantization_bits", "8", "--moving_average"]


def job_config(flags: list[str]) -> RunConfig:
    """The RunConfig ``lptfl run`` builds from ``flags``."""
    return config_from_args(build_parser().parse_args(["run", *flags]))


def tool(name: str) -> str:
    """A console script of this Python environment."""
    return str(Path(sys.executable).parent / name)


def run_lptfl(flags: list[str], out: Path, log_path: Path) -> float:
    """Seconds of ``lptfl run`` (process start to exit); results in ``out``."""
    with open(log_path, "wb") as log_file:
        started = time.perf_counter()
        done = subprocess.run([tool("lptfl"), "run", *flags, "--out", str(out), "--overwrite", "--quiet"],
                              stdout=log_file, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        seconds = time.perf_counter() - started
    if done.returncode != 0:
        raise RuntimeError(f"lptfl run exited with {done.returncode}; see {log_path}")
    return seconds


def listening(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.settimeout(0.5)
        return s.connect_ex(("127.0.0.1", port)) == 0


class SimulationRun:
    """A ``flower-superlink --simulation`` and one ``flwr run`` of lptfl's app on it (FLWR_HOME: ``home``)."""

    def __init__(self, home: Path, supernodes: int, cpus_per_client: int) -> None:
        self.home, self.port = home, free_ports(1)[0]
        home.mkdir(parents=True, exist_ok=True)
        at_once = max(1, (os.cpu_count() or 1) // cpus_per_client)
        self.env = flower_env(home, processes=min(supernodes, at_once))
        (home / "config.toml").write_text(
            f'[superlink]\ndefault = "{CONNECTION}"\n\n[superlink.{CONNECTION}]\n'
            f'address = "127.0.0.1:{self.port}"\ninsecure = true\n'
            f"options.num-supernodes = {supernodes}\n"
            f"options.backend.client-resources.num-cpus = {cpus_per_client}\n",
            encoding="utf-8")
        self.superlink: subprocess.Popen | None = None

    def flwr(self, *args: str, timeout: float = 120) -> dict:
        """``flwr ARGS --format json``'s reply ({} if it is not a JSON object)."""
        done = subprocess.run([tool("flwr"), *args, "--format", "json"], env=self.env, cwd=self.home,
                              capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL)
        try:
            reply = json.loads(done.stdout)
        except json.JSONDecodeError:
            return {}
        return reply if isinstance(reply, dict) else {}

    def start(self, timeout: float = 120) -> None:
        """Start the SuperLink and wait until it listens."""
        with open(self.home / "superlink.log", "wb") as log_file:
            self.superlink = subprocess.Popen(
                [tool("flower-superlink"), "--insecure", "--simulation", "--host", "127.0.0.1",
                 "--port", str(self.port)],
                env=self.env, cwd=self.home, stdout=log_file, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                start_new_session=True)
        deadline = time.monotonic() + timeout
        while not listening(self.port):
            self.check_alive()
            if time.monotonic() > deadline:
                raise RuntimeError(f"the SuperLink did not listen on port {self.port} within {timeout:.0f} s")
            time.sleep(0.1)

    def check_alive(self) -> None:
        if self.superlink is not None and self.superlink.poll() is not None:
            log_path = self.home / "superlink.log"
            raise RuntimeError(f"the SuperLink exited with {self.superlink.returncode}; see {log_path}")

    def submit(self, app_dir: Path) -> str:
        """``flwr run`` the app; its run id."""
        reply = self.flwr("run", str(app_dir), CONNECTION)
        if not reply.get("success") or "run-id" not in reply:
            raise RuntimeError(f"flwr run was refused: {reply}")
        return str(reply["run-id"])

    def status(self, run_id: str) -> dict:
        runs = self.flwr("ls", CONNECTION, "--run-id", run_id, timeout=60).get("runs") or []
        return runs[0] if runs else {}

    def wait(self, run_id: str, summary: Path, timeout: float, status_every_s: float = 15.0) -> dict:
        """Wait for ``summary`` (the ServerApp writes it last) and a ``finished:`` status; return that
        entry. ``flwr ls`` starts a Python process, so before the summary exists it is only asked
        every ``status_every_s`` seconds (to notice a failed run), not to take the cores from Ray."""
        deadline, asked = time.monotonic() + timeout, time.monotonic()
        while True:
            self.check_alive()
            if time.monotonic() > deadline:
                raise RuntimeError(f"run {run_id} did not finish within {timeout:.0f} s; see {self.home}")
            if summary.exists() or time.monotonic() - asked > status_every_s:
                entry, asked = self.status(run_id), time.monotonic()
                if str(entry.get("status", "")).startswith("finished:"):
                    return entry
            time.sleep(0.2)

    def stop(self, grace_s: float = 20.0) -> None:
        """SIGTERM the SuperLink's process group (Ray included), SIGKILL it after ``grace_s``, reap it."""
        if self.superlink is None:
            return
        for sig, wait_s in ((signal.SIGTERM, grace_s), (signal.SIGKILL, None)):
            try:
                os.killpg(self.superlink.pid, sig)
            except ProcessLookupError:
                pass
            try:
                self.superlink.wait(timeout=wait_s)
            except subprocess.TimeoutExpired:
                continue


def run_flower(config: RunConfig, out: Path, home: Path, cpus_per_client: int, timeout: float) -> tuple[float, float]:
    """Seconds of the job on the Simulation Engine (SuperLink launch to completed run) and of the tear-down."""
    options = FlowerOptions(out_dir=str(out), min_nodes=config.num_clients)
    app_dir = write_app(home / "app", to_flower_config(config, options))
    run = SimulationRun(home, config.num_clients, cpus_per_client)
    started = time.perf_counter()
    try:
        run.start()
        entry = run.wait(run.submit(app_dir), out / SUMMARY, timeout)
        seconds = time.perf_counter() - started
    finally:
        stop_started = time.perf_counter()
        run.stop()
    if entry.get("status") != "finished:completed":
        raise RuntimeError(f"the Flower run ended {entry.get('status')!r}: {entry.get('status-details', '')}")
    return seconds, time.perf_counter() - stop_started


def compare_accuracies(ours: list[dict], theirs: list[dict], tolerance: float) -> tuple[float, bool]:
    """The largest per-round ``test_accuracy`` difference (0-1) of two runs' metrics rows, and whether
    it is within ``tolerance``. Raises ``ValueError`` if the runs recorded different rounds."""
    rounds = [r["round"] for r in ours], [r["round"] for r in theirs]
    if rounds[0] != rounds[1] or not rounds[0]:
        raise ValueError(f"rounds recorded: lptfl {rounds[0]}, Flower {rounds[1]}; expected the same, at least one")
    max_diff = max(abs(a["test_accuracy"] - b["test_accuracy"]) for a, b in zip(ours, theirs))
    return max_diff, max_diff <= tolerance


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", type=int, default=3)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--flower_cpus_per_client", type=int, default=1,
                        help="Ray's num-cpus per ClientApp (1: as many clients at once as cores)")
    parser.add_argument("--tolerance", type=float, default=1e-6, help="largest per-round accuracy difference (0-1)")
    parser.add_argument("--timeout", type=float, default=900, help="seconds the Flower run may take")
    parser.add_argument("--work_dir", type=Path, help="keep both runs' outputs and Flower's logs here (default: a "
                                                      "temporary directory)")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    flags = job_flags(args.clients, args.rounds)
    config = job_config(flags)
    load_before = os.getloadavg()[0]
    with tempfile.TemporaryDirectory(prefix="bench-vs-flower-") as tmp:
        work = (args.work_dir or Path(tmp)).resolve()
        work.mkdir(parents=True, exist_ok=True)
        lptfl_s = run_lptfl(flags, work / "lptfl", work / "lptfl.log")
        flower_s, teardown_s = run_flower(config, work / "flower", work / "flower-home", args.flower_cpus_per_client,
                                          args.timeout)
        ours, theirs = read_metrics(work / "lptfl"), read_metrics(work / "flower")
    max_diff, agree = compare_accuracies(ours, theirs, args.tolerance)
    result = {
        "machine": platform.processor() or platform.machine(),
        "cores": os.cpu_count(),
        "job": " ".join(flags),
        "lptfl_s": round(lptfl_s, 2),
        "flower_s": round(flower_s, 2),
        "flower_teardown_s": round(teardown_s, 2),
        "ratio_flower_over_lptfl": round(flower_s / lptfl_s, 3),
        "lptfl_at_least_2x_faster": flower_s >= 2 * lptfl_s,
        "lptfl_accuracy": [a["test_accuracy"] for a in ours],
        "flower_accuracy": [b["test_accuracy"] for b in theirs],
        "max_accuracy_diff": max_diff,
        "accuracies_agree": agree,
        "load_1min_before_after": [round(load_before, 2), round(os.getloadavg()[0], 2)],
    }
    if not args.json:
        for key, value in result.items():
            print(f"{key:28s} {value}")
    print(json.dumps(result))


if __name__ == "__main__":
    main()
