"""Resumable grids of runs (the paper reproduction, algorithm comparisons).

Each run is one ``lptfl run`` process writing into its own folder with a checkpoint every
round. A run whose ``summary.json`` reports all its rounds is skipped; a run with a saved
config continues with ``--resume``. Up to ``parallel`` runs go at once, each given an equal
share of the CPU threads, so several long runs advance together and an interruption
loses at most one round of each. With more runs than processes, runs can take turns of a
few rounds each (``turn_rounds``): all advance together without more processes than cores.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import tarfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from lptfl.sim.stop_signals import stop_signals_to

log = logging.getLogger(__name__)

# Flags a resumed run takes from the grid (where the data are, where it runs); all else is the run's own.
RESUME_OVERRIDES = ("--device", "--data_path", "--compile")
RESULT_FILES = frozenset({"metrics.jsonl", "summary.json", "config.json", "table.md", "curves.png"})


@dataclass(frozen=True)
class GridRun:
    """One run of a grid: its folder and its ``lptfl run`` flags (without ``--out``)."""

    run_dir: Path
    flags: tuple[str, ...]


def rounds_done(run_dir: Path) -> int:
    """Rounds finished in ``run_dir`` (0 when it holds no run yet)."""
    summary = run_dir / "summary.json"
    if summary.exists():
        return int(json.loads(summary.read_text())["rounds"])
    return 0


def run_command(run: GridRun, rounds: int, checkpoint_every: int = 1,
                stop_after: int | None = None, workers: int = 1) -> list[str] | None:
    """The command that starts or resumes ``run`` to ``rounds`` rounds; None when it is done.

    ``checkpoint_every`` applies to a run's start (a resumed run keeps its saved setting); a
    resumed run takes ``--device``, ``--data_path`` and ``--compile`` from the grid's flags, so a
    run started on one machine continues on another. ``stop_after`` (a round below ``rounds``)
    pauses the run there with a checkpoint; the run's own length stays ``rounds``. ``workers`` is the
    run's ``--workers`` (processes that train its rounds' clients).
    """
    if rounds_done(run.run_dir) >= rounds:
        return None
    extra = ["--workers", str(workers)]
    if stop_after is not None and stop_after < rounds:
        extra += ["--stop_after", str(stop_after)]
    if (run.run_dir / "config.json").exists():
        overrides = [part for i, flag in enumerate(run.flags[:-1]) if flag in RESUME_OVERRIDES
                     for part in (flag, run.flags[i + 1])]
        return [sys.executable, "-m", "lptfl", "run", "--resume", str(run.run_dir), *overrides,
                "--c_rounds", str(rounds), *extra, "--quiet"]
    return [sys.executable, "-m", "lptfl", "run", *run.flags, "--c_rounds", str(rounds), "--out", str(run.run_dir),
            "--checkpoint_every", str(checkpoint_every), *extra, "--quiet"]


def _interrupt(signum: int, _frame) -> None:
    raise KeyboardInterrupt(signal.Signals(signum).name)


def run_grid(runs: Sequence[GridRun], rounds: int, *, parallel: int = 1, turn_rounds: int = 0,
             after_each: Callable[[], None] | None = None, poll_s: float = 2.0,
             checkpoint_every: int = 1, threads: int = 0, workers: int = 1) -> None:
    """Bring every run of ``runs`` to ``rounds`` rounds, ``parallel`` at a time.

    SIGINT and SIGTERM stop the grid (KeyboardInterrupt), also where a shell started it in the
    background with SIGINT ignored: each running process is sent SIGTERM and stops after saving
    its round (one that also got the terminal's SIGINT stops at once, keeping its last checkpoint).

    Args:
        runs: the grid.
        rounds: rounds each run must reach.
        parallel: processes at once; each gets ``max(1, cpus // parallel)`` threads.
        turn_rounds: rounds a run advances in one turn before it yields its process to the
            next waiting run and queues again (0: a run goes to ``rounds`` in one turn). With
            three runs on two cores, ``parallel=2, turn_rounds=5`` keeps all three advancing
            with one process per core (one run's memory fewer than ``parallel=3``).
        after_each: called after each process ends (e.g. to rewrite a table).
        poll_s: seconds between checks of the running processes.
        checkpoint_every: rounds between checkpoints of a starting run (an interrupted run
            loses at most this many rounds; a stop signal always checkpoints first).
        threads: torch threads of each process (0: ``max(1, cpus // parallel)``). A run resumed
            under another thread count than it started with trains validly but not bit-identically
            (the run warns); give the one it started with to retrace an earlier run exactly.
        workers: processes of each run (its ``--workers``), each with ``threads`` threads.

    Raises:
        RuntimeError: a run's process failed (the others are left to finish first).
    """
    if parallel < 1:
        raise ValueError(f"parallel must be >= 1, got {parallel}")
    if turn_rounds < 0:
        raise ValueError(f"turn_rounds must be >= 0 (0: no turns), got {turn_rounds}")
    if threads < 0:
        raise ValueError(f"threads must be >= 0 (0: cpus // parallel), got {threads}")
    threads = threads or max(1, (os.cpu_count() or 1) // parallel)
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
    pending = list(runs)
    active: list[tuple[GridRun, subprocess.Popen, float, int]] = []
    failures: list[str] = []
    with stop_signals_to(_interrupt):
        try:
            while pending or active:
                while pending and len(active) < parallel:
                    run = pending.pop(0)
                    before = rounds_done(run.run_dir)
                    stop_after = before + turn_rounds if turn_rounds else None
                    command = run_command(run, rounds, checkpoint_every, stop_after, workers)
                    if command is None:
                        log.info("%s: finished already, skipped", run.run_dir.name)
                        continue
                    log.info("%s: %s%s", run.run_dir.name, "resuming" if "--resume" in command else "starting",
                             f" until round {stop_after}" if "--stop_after" in command else "")
                    active.append((run, subprocess.Popen(command, env=env), time.time(), before))
                time.sleep(poll_s if active else 0)
                for entry in list(active):
                    run, process, started, before = entry
                    if process.poll() is None:
                        continue
                    active.remove(entry)
                    done = rounds_done(run.run_dir)
                    if process.returncode == 0 and before < done < rounds:
                        log.info("%s: round %d reached in %.0f s, queued for its next turn",
                                 run.run_dir.name, done, time.time() - started)
                        pending.append(run)
                    elif process.returncode == 0 and done < rounds:
                        failures.append(f"{run.run_dir.name} (stopped at round {done} of {rounds} without progress)")
                        log.error("%s: ended at round %d of %d without progress", run.run_dir.name, done, rounds)
                    elif process.returncode == 0:
                        log.info("%s: done in %.0f s", run.run_dir.name, time.time() - started)
                    else:
                        failures.append(f"{run.run_dir.name} (exit {process.returncode})")
                        log.error("%s: failed with exit status %d", run.run_dir.name, process.returncode)
                    if after_each is not None:
                        after_each()
        finally:
            for _, process, _, _ in active:  # interrupted: let each run checkpoint and stop
                process.terminate()
            for _, process, _, _ in active:
                process.wait()
    if failures:
        raise RuntimeError(f"runs failed: {', '.join(failures)}")


def archive(out: Path, path: Path) -> None:
    """Pack the result files under ``out`` (no checkpoints) into the ``.tar.gz`` ``path``."""
    with tarfile.open(path, "w:gz") as tar:
        for file in sorted(out.rglob("*")):
            if file.is_file() and file.name in RESULT_FILES:
                tar.add(file, arcname=str(file.relative_to(out.parent)))
