"""Runs a whole experiment into an output directory: rounds, metrics, summary, curves."""

from __future__ import annotations

import logging
import shutil
import signal
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import asdict
from pathlib import Path

from tqdm import tqdm

from lptfl.experiment.config import RunConfig
from lptfl.experiment.results import (
    CURVES,
    METRICS,
    SUMMARY,
    append_metrics,
    numerics,
    numerics_changes,
    read_metrics,
    summarize,
    write_summary,
)
from lptfl.experiment.setup import check_device
from lptfl.experiment.tracking import check_tracker, open_tracker
from lptfl.sim.checkpoint import (
    CHECKPOINT,
    CONFIG,
    CheckpointError,
    check_resumable,
    load_checkpoint,
    refuse_restart_without_checkpoint,
    remove_checkpoints,
    restore_simulation,
    save_checkpoint,
    truncate_metrics,
    write_config,
)
from lptfl.sim.engine import Simulation
from lptfl.stop_signals import stop_signals_to

log = logging.getLogger(__name__)


class OutputExistsError(ValueError):
    """The output directory already holds a run, or is a file."""


class RunInterrupted(Exception):
    """SIGINT/SIGTERM stopped the run after a finished, checkpointed round."""

    def __init__(self, signum: int, round_index: int, out_dir: Path) -> None:
        self.signum, self.round, self.out_dir = signum, round_index, out_dir
        name = signal.Signals(signum).name
        super().__init__(f"stopped by {name} after round {round_index} (checkpoint and metrics saved); "
                         f"continue with: lptfl run --resume {out_dir}")


def prepare_output(out_dir: Path, *, overwrite: bool) -> None:
    """Create ``out_dir``; refuse one that holds results unless ``overwrite`` (then clear them)."""
    if out_dir.exists() and not out_dir.is_dir():
        raise OutputExistsError(f"--out {out_dir} is a file, not a directory; choose another --out")
    out_dir.mkdir(parents=True, exist_ok=True)
    existing = [name for name in (METRICS, SUMMARY, CURVES, CONFIG, CHECKPOINT) if (out_dir / name).exists()]
    if existing and not overwrite:
        raise OutputExistsError(
            f"{out_dir} already holds a run ({', '.join(existing)}); pass --overwrite to replace it, "
            "--resume to continue it, or choose another --out"
        )
    for name in existing:
        (out_dir / name).unlink()
    if overwrite:
        remove_checkpoints(out_dir)
        shutil.rmtree(out_dir / "client_state", ignore_errors=True)  # a disk store of the old run


def _missing_parent(path: Path) -> Path | None:
    """The outermost of ``path`` and its parents that does not exist yet (None: ``path`` exists)."""
    missing = None
    for folder in (path, *path.parents):
        if folder.exists():
            return missing
        missing = folder
    return missing


@contextmanager
def _undone_unless_started(out_dir: Path, created: Path | None) -> Iterator[None]:
    """Remove what a fresh run put into ``out_dir`` (its ``config.json``, client-state store, and
    the folders made for it) when the body fails before round 1's metrics are written, so that
    the corrected command runs instead of finding "a run" there."""
    try:
        yield
    except BaseException:
        if not (out_dir / METRICS).exists():
            (out_dir / CONFIG).unlink(missing_ok=True)
            shutil.rmtree(out_dir / "client_state", ignore_errors=True)
            if created is not None:
                for folder in (out_dir, *out_dir.parents):
                    if not folder.is_dir() or any(folder.iterdir()):
                        break
                    folder.rmdir()
                    if folder == created:
                        break
        raise


def run_experiment(
    config: RunConfig, out_dir: Path, *, overwrite: bool = False, progress: bool = True, resume: bool = False,
    stop_after: int | None = None,
) -> dict:
    """Run ``config`` for ``config.c_rounds`` rounds, writing results into ``out_dir``.

    Every ``config.checkpoint_every`` rounds (and after the last) the state is checkpointed
    (:mod:`lptfl.sim.checkpoint`). With ``resume`` the run in ``out_dir`` continues from its
    checkpoint (``config`` must have its fingerprint). SIGINT/SIGTERM finish the current round,
    write its metrics line, a checkpoint and the summary of the rounds so far (``rounds`` below
    ``config.c_rounds``), then raise :class:`RunInterrupted`. ``stop_after`` ends the run the
    same way after that round, without an error, so that a later ``resume`` continues it (runs
    taking turns on a shared CPU, :func:`lptfl.grid.run_grid`).

    Returns:
        The summary (also written to ``out_dir/summary.json``).
    """
    from lptfl.report import plot_curves

    config.validate()
    check_device(config.device)
    check_tracker(config.log)
    if stop_after is not None and stop_after < 1:
        raise ValueError(f"stop_after must be a round >= 1, got {stop_after}")
    last_round = config.c_rounds if stop_after is None else min(stop_after, config.c_rounds)
    out_dir = Path(out_dir)
    stop: dict[str, int] = {}
    running: dict[str, int | None] = {"round": None}  # the round in progress; None while the run is set up

    def request_stop(signum: int, _frame) -> None:
        if stop:
            raise KeyboardInterrupt  # a second signal: stop at once (the last checkpoint stays valid)
        stop["signum"] = signum
        name = signal.Signals(signum).name
        if running["round"] is None:
            log.warning("%s: stopping before the next round, once the summary of the rounds so far is written "
                        "(repeat to stop at once)", name)
        else:
            log.warning("%s: finishing round %d, then saving a checkpoint and stopping (repeat to stop at once)",
                        name, running["round"])

    # Held from the start until the summary is written, so that a stop signal at any point (even
    # while the run is being set up) still leaves a summary of the rounds so far.
    with stop_signals_to(request_stop):
        checkpoint = None
        if resume:  # every check before the first change to the run folder: a refusal changes nothing
            if not (out_dir / CONFIG).exists():
                raise FileNotFoundError(f"cannot resume {out_dir}: no {CONFIG} there")
            checkpoint = load_checkpoint(out_dir)
            if checkpoint is None:
                refuse_restart_without_checkpoint(out_dir, METRICS)
            elif checkpoint.fingerprint != config.fingerprint():
                raise CheckpointError(f"cannot resume {out_dir}: its checkpoint belongs to other settings "
                                      f"(fingerprint {checkpoint.fingerprint}, these settings' is "
                                      f"{config.fingerprint()})")
            else:
                check_resumable(out_dir, checkpoint, config, METRICS)
            started = nullcontext()
        else:
            created = _missing_parent(out_dir)
            prepare_output(out_dir, overwrite=overwrite)
            started = _undone_unless_started(out_dir, created)
        with started:
            sim = Simulation(config, out_dir)
            lines = 0
            if resume:
                restore_simulation(sim, checkpoint)
                lines = checkpoint.metrics_lines if checkpoint is not None else 0
                truncate_metrics(out_dir, lines, METRICS)
                log.info("resuming %s after round %d", out_dir, sim.round)
                changed = numerics_changes(checkpoint.numerics, numerics(sim.device)) if checkpoint is not None else []
                if changed:
                    log.warning("%s: resuming under other numerics than the checkpointed rounds (%s): the rounds "
                                "from here train validly but are not bit-identical to an uninterrupted run's",
                                out_dir, "; ".join(changed))
                for name in (SUMMARY, CURVES):  # stale from here on; rewritten when the run ends or is stopped
                    if (out_dir / name).exists():
                        (out_dir / name).unlink()
            write_config(out_dir, config)  # on resume: the same experiment, perhaps with a larger --c_rounds
            tracker = open_tracker(config.log, out_dir, config)
            bar = tqdm(total=config.c_rounds, initial=sim.round, desc="rounds", unit="round", disable=not progress)
            while sim.round < last_round and not stop:
                running["round"] = sim.round + 1  # the server counts a round done before its evaluation
                metrics = sim.run_round()
                append_metrics(out_dir, metrics)
                if tracker is not None:
                    tracker.log_round(asdict(metrics))
                lines += 1
                every = config.checkpoint_every
                if stop or sim.round == stop_after or (every and (sim.round % every == 0 or sim.round == config.c_rounds)):
                    save_checkpoint(out_dir, sim, metrics_lines=lines)
                bar.update(1)
                if metrics.test_accuracy is not None:  # None: a round not evaluated (--eval_every)
                    bar.set_postfix(acc=f"{metrics.test_accuracy:.4f}", loss=f"{metrics.train_loss:.3f}")
            bar.close()
        summary = summarize(config, read_metrics(out_dir), wall_time_s=sim.wall_time_s)
        write_summary(out_dir, summary)
        plot_curves([out_dir], out_dir / CURVES)
        if tracker is not None:
            tracker.finish(out_dir / CURVES)
    if sim.round < last_round:
        raise RunInterrupted(stop["signum"], sim.round, out_dir)
    return summary
