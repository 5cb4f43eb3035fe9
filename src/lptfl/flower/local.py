"""A Flower federation on this machine (Deployment Engine, 127.0.0.1): ``lptfl flower-local``.

Starts one SuperLink and N SuperNodes (SuperNode ``i`` holds partition ``i`` of N), runs the
LPT-FL app with ``flwr run``, polls ``flwr ls`` until the run has finished, and stops every
process it started. Exit codes of ``flwr`` do not tell success from failure, so success is
the run's status ``finished:completed`` *and* the ServerApp's ``summary.json`` with every round.

The app handed to ``flwr run`` is a small generated directory holding only a
``pyproject.toml`` (components ``lptfl.flower.server_app:app`` / ``lptfl.flower.client_app:app``
and the run config as its defaults); the code itself is the installed ``lptfl``.
Flower is not imported here: it runs in the processes started.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from collections.abc import Callable
from pathlib import Path
from typing import Any

from lptfl.experiment.config import RunConfig
from lptfl.flower.config import FlowerOptions, to_flower_config, toml_table

log = logging.getLogger(__name__)

FEDERATION = "local-deploy"
SERVER_APP = "lptfl.flower.server_app:app"
CLIENT_APP = "lptfl.flower.client_app:app"


class FlowerRunError(RuntimeError):
    """The Flower run did not complete (the message says why; logs are in the federation's home)."""


@dataclass
class TLSFiles:
    """Certificates for a TLS federation: the CA, and the SuperLink's certificate and key."""

    ca_cert: Path
    server_cert: Path
    server_key: Path


def make_certificates(directory: Path, *, days: int = 2) -> TLSFiles:
    """A throwaway CA and a SuperLink certificate for 127.0.0.1/localhost (needs ``openssl``).

    For trying TLS on one machine; a real federation uses certificates from its own CA, with
    the SuperLink's host name or IP address in ``subjectAltName``.
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    openssl = shutil.which("openssl")
    if openssl is None:
        raise FlowerRunError("openssl is needed to make TLS certificates")
    ca_key, ca_cert = directory / "ca.key", directory / "ca.crt"
    key, csr, cert = directory / "server.key", directory / "server.csr", directory / "server.pem"
    ext = directory / "server.ext"
    ext.write_text("subjectAltName=IP:127.0.0.1,DNS:localhost\n", encoding="utf-8")
    steps = [
        ["req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", ca_key, "-out", ca_cert,
         "-days", str(days), "-subj", "/CN=lptfl-test-ca"],
        ["req", "-newkey", "rsa:2048", "-nodes", "-keyout", key, "-out", csr, "-subj", "/CN=127.0.0.1"],
        ["x509", "-req", "-in", csr, "-CA", ca_cert, "-CAkey", ca_key, "-CAcreateserial", "-out", cert,
         "-days", str(days), "-sha256", "-extfile", ext],
    ]
    for step in steps:
        done = subprocess.run([openssl, *map(str, step)], capture_output=True, text=True, stdin=subprocess.DEVNULL)
        if done.returncode != 0:
            raise FlowerRunError(f"openssl {step[0]} failed: {done.stderr.strip()}")
    return TLSFiles(ca_cert=ca_cert, server_cert=cert, server_key=key)


def local_security(directory: Path, *, insecure: bool) -> TLSFiles | None:
    """TLS for a local federation (the default: any local user can reach a SuperLink on
    loopback), certificates made in ``directory``; None (no TLS) only when ``insecure``.

    Raises:
        FlowerRunError: openssl is not on PATH (install it, or ask for ``--insecure``).
    """
    if insecure:
        log.warning("the local federation runs without TLS (--insecure): any local user can reach its SuperLink")
        return None
    if shutil.which("openssl") is None:
        raise FlowerRunError("the local federation uses TLS, whose certificates need openssl, which is not on "
                             "PATH; install openssl, or pass --insecure to run without TLS")
    return make_certificates(directory)


def make_supernode_key(directory: Path, name: str) -> Path:
    """A SuperNode authentication key pair: ``name`` (private) and ``name.pub`` (public).

    ECDSA on NIST P-384 in OpenSSH format, as ``ssh-keygen -t ecdsa -b 384 -N "" -f name``
    makes; needs ``cryptography`` (a Flower dependency). Returns the private key's path.
    """
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    key = ec.generate_private_key(ec.SECP384R1())
    private = directory / name
    private.write_bytes(key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH, serialization.NoEncryption()))
    private.chmod(0o600)
    Path(f"{private}.pub").write_bytes(key.public_key().public_bytes(
        serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH) + b"\n")
    return private


def free_ports(count: int, host: str = "127.0.0.1") -> list[int]:
    """``count`` distinct TCP ports free right now on ``host``."""
    sockets, ports = [], []
    try:
        for _ in range(count):
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            s.bind((host, 0))
            sockets.append(s)
            ports.append(s.getsockname()[1])
    finally:
        for s in sockets:
            s.close()
    return ports


def write_app(app_dir: Path, run_config: dict[str, Any]) -> Path:
    """Write a Flower app directory whose defaults are ``run_config``."""
    app_dir.mkdir(parents=True, exist_ok=True)
    lines = [
        "[build-system]", 'requires = ["hatchling"]', 'build-backend = "hatchling.build"', "",
        "[project]", 'name = "lptfl-app"', 'version = "0.1.0"',
        'description = "LPT-FL on Flower (code from the installed lptfl package)"', 'license = "MIT"',
        "dependencies = []", "",
        "[tool.flwr.app]", 'publisher = "lptfl"', "",
        "[tool.flwr.app.components]", f'serverapp = "{SERVER_APP}"', f'clientapp = "{CLIENT_APP}"', "",
        "[tool.flwr.app.config]", toml_table(run_config),
    ]
    (app_dir / "pyproject.toml").write_text("\n".join(lines), encoding="utf-8")
    return app_dir


def flower_env(home: Path, *, processes: int = 1) -> dict[str, str]:
    """The environment of every Flower process (private home, no network calls, no installs).

    ``processes`` training processes share this machine: unless ``OMP_NUM_THREADS`` is set,
    each gets ``cpu_count // processes`` threads (oversubscribed torch threads slow all down).
    """
    env = dict(os.environ)
    env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // max(1, processes))))
    bin_dir = str(Path(sys.executable).parent)
    env.update(
        FLWR_HOME=str(home),
        FLWR_TELEMETRY_ENABLED="0",
        FLWR_DISABLE_UPDATE_CHECK="1",
        FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION="1",
        FLWR_SUPEREXEC_TASK_POLL_INTERVAL=env.get("FLWR_SUPEREXEC_TASK_POLL_INTERVAL", "0.1"),
        PATH=bin_dir + os.pathsep + env.get("PATH", ""),
        PYTHONUNBUFFERED="1",
    )
    return env


def _tool(name: str) -> str:
    candidate = Path(sys.executable).parent / name
    if candidate.exists():
        return str(candidate)
    found = shutil.which(name)
    if found is None:
        raise FlowerRunError(f"{name} not found; install Flower with: pip install 'lptfl[flower]'")
    return found


@dataclass
class LocalFederation:
    """One SuperLink and ``supernodes`` SuperNodes on 127.0.0.1, started and stopped together.

    Use as a context manager: every process started is stopped on exit (also after an
    exception or Ctrl-C): SIGTERM to its process group, then SIGKILL, then ``wait()``.

    Args:
        supernodes: number of SuperNodes (SuperNode i gets ``partition-id=i num-partitions=N``).
        home: FLWR_HOME and log directory (None: a temporary directory, removed at exit).
        tls: certificates for a TLS federation (None: insecure, loopback only).
        supernode_keys: SuperNode authentication (needs ``tls``): one private key per SuperNode
            (OpenSSH-format EC key, see :func:`make_supernode_key`). The SuperLink starts with
            ``--enable-supernode-auth``, each key's ``.pub`` is registered with
            ``flwr supernode register`` and SuperNode i starts with
            ``--auth-supernode-private-key supernode_keys[i]``.
    """

    supernodes: int
    home: Path | None = None
    tls: TLSFiles | None = None
    host: str = "127.0.0.1"
    supernode_keys: list[Path] | None = None
    processes: list[subprocess.Popen] = field(default_factory=list)
    _tmp: tempfile.TemporaryDirectory | None = None

    def __post_init__(self) -> None:
        if self.supernodes < 1:
            raise ValueError(f"--supernodes must be >= 1, got {self.supernodes}")
        if self.home is None:
            self._tmp = tempfile.TemporaryDirectory(prefix="lptfl-flower-")
            self.home = Path(self._tmp.name)
        self.home = Path(self.home).resolve()
        (self.home / "logs").mkdir(parents=True, exist_ok=True)
        self.env = flower_env(self.home, processes=self.supernodes)
        self.superlink_port = 0
        self.node_ports: list[int] = []

    # -- processes ---------------------------------------------------------------------------
    def _spawn(self, name: str, args: list[str]) -> subprocess.Popen:
        log_file = open(self.home / "logs" / f"{name}.log", "wb")  # noqa: SIM115 (closed with the process)
        try:
            proc = subprocess.Popen(
                args, env=self.env, cwd=self.home, stdout=log_file, stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL, start_new_session=True,
            )
        finally:
            log_file.close()
        proc.lptfl_name = name  # type: ignore[attr-defined]
        self.processes.append(proc)
        return proc

    def _security_args(self, role: str) -> list[str]:
        if self.tls is None:
            return ["--insecure"]
        if role == "superlink":
            return ["--ssl-certfile", str(self.tls.server_cert), "--ssl-keyfile", str(self.tls.server_key),
                    "--ssl-ca-certfile", str(self.tls.ca_cert)]
        return ["--root-certificates", str(self.tls.ca_cert)]

    def register_supernode(self, public_key: Path) -> None:
        """Register a SuperNode's public key (``flwr supernode register``) with the SuperLink."""
        done = self.flwr("supernode", "register", str(public_key), FEDERATION, "--format", "json", timeout=60)
        try:
            ok = bool(json.loads(done.stdout).get("success"))
        except json.JSONDecodeError:
            ok = False
        if not ok:
            raise FlowerRunError(f"flwr supernode register {public_key} failed: {done.stdout.strip()} {done.stderr.strip()}")

    def _wait_port(self, port: int, proc: subprocess.Popen, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                raise FlowerRunError(f"{proc.lptfl_name} exited with {proc.returncode}; see {self.log_path(proc.lptfl_name)}")  # type: ignore[attr-defined]
            with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
                s.settimeout(0.5)
                if s.connect_ex((self.host, port)) == 0:
                    return
            time.sleep(0.2)
        raise FlowerRunError(f"{proc.lptfl_name} did not listen on port {port} within {timeout:.0f} s")  # type: ignore[attr-defined]

    def log_path(self, name: str) -> Path:
        return self.home / "logs" / f"{name}.log"

    def start(self, timeout: float = 60.0) -> None:
        """Start the SuperLink, wait until it listens, start the SuperNodes."""
        ports = free_ports(1 + self.supernodes, self.host)
        self.superlink_port, self.node_ports = ports[0], ports[1:]
        if self.supernode_keys:
            if self.tls is None:
                raise ValueError("SuperNode authentication needs TLS (tls=make_certificates(...))")
            if len(self.supernode_keys) != self.supernodes:
                raise ValueError(f"{len(self.supernode_keys)} SuperNode keys for {self.supernodes} SuperNodes")
        superlink = self._spawn("superlink", [
            _tool("flower-superlink"), *self._security_args("superlink"),
            *(["--enable-supernode-auth"] if self.supernode_keys else []),
            "--host", self.host, "--port", str(self.superlink_port),
        ])
        self._wait_port(self.superlink_port, superlink, timeout)
        if self.supernode_keys:
            self._write_connection()  # `flwr supernode register` needs the connection
            for key in self.supernode_keys:
                self.register_supernode(Path(f"{key}.pub"))
        for i, port in enumerate(self.node_ports):
            self._spawn(f"supernode-{i}", [
                _tool("flower-supernode"), *self._security_args("supernode"),
                "--superlink", f"{self.host}:{self.superlink_port}", "--port", str(port),
                "--node-config", f"partition-id={i} num-partitions={self.supernodes}",
                *(["--auth-supernode-private-key", str(self.supernode_keys[i])] if self.supernode_keys else []),
            ])
        self._write_connection()

    def _write_connection(self) -> None:
        lines = ["[superlink]", f'default = "{FEDERATION}"', "", f"[superlink.{FEDERATION}]",
                 f'address = "{self.host}:{self.superlink_port}"']
        if self.tls is None:
            lines.append("insecure = true")
        else:
            lines.append(f'root-certificates = "{self.tls.ca_cert.resolve()}"')
        (self.home / "config.toml").write_text("\n".join(lines) + "\n", encoding="utf-8")

    def check_alive(self) -> None:
        """Raise if a process of the federation has exited."""
        for proc in self.processes:
            if proc.poll() is not None:
                raise FlowerRunError(
                    f"{proc.lptfl_name} exited with {proc.returncode}; see {self.log_path(proc.lptfl_name)}"  # type: ignore[attr-defined]
                )

    def stop(self, grace_s: float = 10.0) -> None:
        """SIGTERM every process of the federation, SIGKILL what is left after ``grace_s``, reap all.

        The federation's processes are the started process groups and every process that carries
        this federation's ``FLWR_HOME``: the SuperLink starts ``flower-superexec`` in a session of
        its own, and that one starts the ServerApp, so neither is reached through the groups.
        """
        for proc in reversed(self.processes):
            if proc.poll() is None:
                _signal_group(proc, signal.SIGTERM)
        for pid in federation_pids(self.home):
            _signal_pid(pid, signal.SIGTERM)
        deadline = time.monotonic() + grace_s
        for proc in reversed(self.processes):
            try:
                proc.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                pass
        for proc in reversed(self.processes):
            # the group may hold helpers (ClientApp processes) even after the leader exited
            _signal_group(proc, signal.SIGKILL)
            if proc.poll() is None:
                proc.wait()
        self.processes.clear()
        while (left := federation_pids(self.home)) and time.monotonic() < deadline:
            time.sleep(0.1)
        for pid in left:
            _signal_pid(pid, signal.SIGKILL)

    def close(self) -> None:
        self.stop()
        if self._tmp is not None:
            self._tmp.cleanup()
            self._tmp = None

    def __enter__(self) -> "LocalFederation":
        try:
            self.start()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # -- the flwr CLI ---------------------------------------------------------------------------
    def flwr(self, *args: str, timeout: float = 120.0) -> subprocess.CompletedProcess:
        return subprocess.run(
            [_tool("flwr"), *args], env=self.env, cwd=self.home, capture_output=True, text=True,
            timeout=timeout, stdin=subprocess.DEVNULL,
        )

    def submit(self, app_dir: Path, overrides: dict[str, Any] | None = None) -> int:
        """``flwr run`` the app (``overrides``: run-config values, passed as a TOML file to ``-c``);
        returns the run id (FlowerRunError if it was not accepted)."""
        extra: list[str] = []
        if overrides:
            path = self.home / f"overrides-{time.monotonic_ns()}.toml"
            path.write_text(toml_table(overrides), encoding="utf-8")
            extra = ["--run-config", str(path)]
        done = self.flwr("run", str(app_dir), FEDERATION, "--format", "json", *extra)
        try:
            reply = json.loads(done.stdout)
        except json.JSONDecodeError:
            reply = {}
        if not reply.get("success") or "run-id" not in reply:
            raise FlowerRunError(f"flwr run failed (exit {done.returncode}): {done.stdout.strip()} {done.stderr.strip()}")
        return int(reply["run-id"])

    def status(self, run_id: int) -> dict:
        """The run's entry of ``flwr ls --run-id`` (``{}`` if it cannot be read now)."""
        done = self.flwr("ls", FEDERATION, "--run-id", str(run_id), "--format", "json", timeout=60)
        try:
            reply = json.loads(done.stdout)
        except json.JSONDecodeError:
            return {}
        runs = reply.get("runs") or []
        return runs[0] if runs else {}

    def wait(self, run_id: int, timeout: float, poll_s: float = 2.0,
             progress: Callable[[], None] | None = None) -> dict:
        """Poll until the run's status starts with ``finished:``; return that entry. ``progress``
        is called at every poll (and once more at the end)."""
        deadline = time.monotonic() + timeout
        while True:
            if progress is not None:
                progress()
            entry = self.status(run_id)
            if str(entry.get("status", "")).startswith("finished:"):
                if progress is not None:
                    progress()
                return entry
            self.check_alive()
            if time.monotonic() > deadline:
                self.flwr("stop", str(run_id), FEDERATION, timeout=60)
                raise FlowerRunError(f"run {run_id} did not finish within {timeout:.0f} s (last status {entry})")
            time.sleep(poll_s)

    def logs(self, run_id: int) -> str:
        done = self.flwr("log", str(run_id), FEDERATION, "--show", timeout=60)
        return done.stdout + done.stderr


class RoundProgress:
    """Logs each round the ServerApp has appended to a run's ``metrics.jsonl`` since the last call."""

    def __init__(self, path: Path, total: int) -> None:
        self.path, self.total, self.seen = Path(path), total, 0

    def __call__(self) -> None:
        try:
            lines = self.path.read_bytes().split(b"\n")[:-1]  # complete lines only
        except FileNotFoundError:
            return
        for line in lines[self.seen:]:
            row = json.loads(line)
            accuracy = row.get("test_accuracy")
            log.info("round %d/%d: test accuracy %s, train loss %.4f, %.1f s", row["round"], self.total,
                     "-" if accuracy is None else f"{accuracy:.4f}", row["train_loss"], row["round_time_s"])
        self.seen = len(lines)


def federation_pids(home: Path) -> set[int]:
    """Processes of this machine whose environment holds ``FLWR_HOME=home`` (every process a
    federation starts inherits it); empty where ``/proc`` cannot be read."""
    marker = f"FLWR_HOME={home}".encode()
    found = set()
    try:
        entries = list(Path("/proc").iterdir())
    except OSError:
        return found
    for entry in entries:
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            environ = (entry / "environ").read_bytes().split(b"\0")
        except OSError:  # gone, or another user's
            continue
        if marker in environ:
            found.add(int(entry.name))
    return found


def _signal_pid(pid: int, sig: int) -> None:
    try:
        os.kill(pid, sig)
    except (ProcessLookupError, PermissionError):
        pass


def _signal_group(proc: subprocess.Popen, sig: int) -> None:
    try:
        os.killpg(proc.pid, sig)  # the group this launcher created for the process (start_new_session)
    except (ProcessLookupError, PermissionError):
        pass


def run_local(
    config: RunConfig,
    out_dir: Path,
    *,
    supernodes: int,
    options: FlowerOptions | None = None,
    home: Path | None = None,
    tls: TLSFiles | None = None,
    timeout: float = 3600.0,
) -> dict:
    """Run ``config`` on a local federation of ``supernodes`` SuperNodes; results in ``out_dir``.

    ``config.num_clients`` is set to ``supernodes`` (one partition per SuperNode).

    Returns:
        The summary the ServerApp wrote (``out_dir/summary.json``).

    Raises:
        FlowerRunError: the federation did not start, the run failed, or its results are missing.
    """
    from dataclasses import replace

    from lptfl.experiment.results import METRICS, SUMMARY, read_metrics

    out_dir = Path(out_dir).resolve()
    out_dir.mkdir(parents=True, exist_ok=True)
    config = replace(config, num_clients=supernodes)
    if config.dataset.lower() != "digits":
        config = replace(config, data_path=str(Path(config.data_path).expanduser().resolve()))
    config.validate()
    options = replace(options or FlowerOptions(), out_dir=str(out_dir))
    options.min_nodes = max(options.min_nodes, supernodes)
    options.validate()
    with LocalFederation(supernodes, home=home, tls=tls) as federation:
        app_dir = write_app(federation.home / "app", to_flower_config(config, options))
        started = time.monotonic()
        run_id = federation.submit(app_dir)
        log.info("run %d submitted to the local federation (%d SuperNodes)", run_id, supernodes)
        entry = federation.wait(run_id, timeout, progress=RoundProgress(out_dir / METRICS, config.c_rounds))
        status = str(entry.get("status"))
        log.info("run %d: %s after %.1f s", run_id, status, time.monotonic() - started)
        summary_path = out_dir / SUMMARY
        rounds = read_metrics(out_dir)
        if status != "finished:completed" or not summary_path.exists() or len(rounds) != config.c_rounds:
            tail = federation.logs(run_id)[-4000:]
            raise FlowerRunError(
                f"run {run_id} ended {status!r} with {len(rounds)} of {config.c_rounds} rounds recorded"
                f"{'' if summary_path.exists() else ' and no summary.json'}; details: {entry.get('status-details', '')}\n"
                f"ServerApp log (tail):\n{tail}"
            )
        return json.loads(summary_path.read_text(encoding="utf-8"))
