"""Runs a whole experiment into an output directory: rounds, metrics, summary, curves."""

from __future__ import annotations

import logging
import signal
from contextlib import nullcontext
from dataclasses import asdict
from pathlib import Path

from tqdm import tqdm

from lptfl.experiment.config import RunConfig
from lptfl.experiment.results import CURVES, numerics, numerics_changes, read_metrics, summarize
from lptfl.experiment.run_dir import CONFIG, CheckpointError, RunDirectory
from lptfl.experiment.setup import check_device
from lptfl.experiment.tracking import check_tracker, open_tracker
from lptfl.experiment.checkpoint import (
    check_resumable,
    load_checkpoint,
    refuse_restart_without_checkpoint,
    restore_run,
    save_checkpoint,
    write_config,
)
from lptfl.sim.engine import Simulation
from lptfl.sim.stop_signals import stop_signals_to

log = logging.getLogger(__name__)


class RunInterrupted(Exception):
    """SIGINT/SIGTERM stopped the run after a finished, checkpointed round."""

    def __init__(self, signum: int, round_index: int, out_dir: Path) -> None:
        self.signum, self.round, self.out_dir = signum, round_index, out_dir
        name = signal.Signals(signum).name
        super().__init__(f"stopped by {name} after round {round_index} (checkpoint and metrics saved); continue "
                         f"with: lptfl run --resume {out_dir}" if round_index else
                         f"stopped by {name} before round 1 (nothing to keep); run the command again to start")


def run_experiment(
    config: RunConfig, out_dir: Path, *, overwrite: bool = False, progress: bool = True, resume: bool = False,
    stop_after: int | None = None,
) -> dict:
    """Run ``config`` for ``config.c_rounds`` rounds, writing results into ``out_dir``.

    Every ``config.checkpoint_every`` rounds (and after the last) the state is checkpointed
    (:mod:`lptfl.experiment.checkpoint`). With ``resume`` the run in ``out_dir`` continues from its
    checkpoint (``config`` must have its fingerprint). SIGINT/SIGTERM finish the current round,
    write its metrics line, a checkpoint and the summary of the rounds so far (``rounds`` below
    ``config.c_rounds``), then raise :class:`RunInterrupted`. ``stop_after`` ends the run the
    same way after that round, without an error, so that a later ``resume`` continues it (runs
    taking turns on a shared CPU, :func:`lptfl.sim.grid.run_grid`).

    Returns:
        The summary (also written to ``out_dir/summary.json``).
    """
    from lptfl.report import plot_curves

    config.validate()
    config.warn_unused()
    check_device(config.device)
    check_tracker(config.log)
    if stop_after is not None and stop_after < 1:
        raise ValueError(f"stop_after must be a round >= 1, got {stop_after}")
    last_round = config.c_rounds if stop_after is None else min(stop_after, config.c_rounds)
    out_dir = Path(out_dir)
    run = RunDirectory(out_dir)
    stop: dict[str, int] = {}
    running: dict[str, int | None] = {"round": None}  # the round in progress; None while the run is set up

    def request_stop(signum: int, _frame) -> None:
        if stop:
            raise KeyboardInterrupt  # a second signal: stop at once (the last checkpoint stays valid)
        stop["signum"] = signum
        name = signal.Signals(signum).name
        if running["round"] is None:
            log.warning("%s: stopping before the next round (repeat to stop at once)", name)
        else:
            log.warning("%s: finishing round %d, then saving a checkpoint and stopping (repeat to stop at once)",
                        name, running["round"])

    # Held from the start until the summary is written, so that a stop signal at any point (even
    # while the run is being set up) still leaves a summary of the rounds so far.
    if resume and not (out_dir / CONFIG).exists():
        raise FileNotFoundError(f"cannot resume {out_dir}: no {CONFIG} there")
    with stop_signals_to(request_stop), run.locked():
        checkpoint = None
        if resume:  # every check before the first change to the run folder: a refusal changes nothing
            checkpoint = load_checkpoint(out_dir)
            if checkpoint is None:
                refuse_restart_without_checkpoint(out_dir)
            elif checkpoint.fingerprint != config.fingerprint():
                raise CheckpointError(f"cannot resume {out_dir}: its checkpoint belongs to other settings "
                                      f"(fingerprint {checkpoint.fingerprint}, these settings' is "
                                      f"{config.fingerprint()})")
            else:
                check_resumable(out_dir, checkpoint, config)
            started = nullcontext()
        else:
            started = run.new_run(overwrite=overwrite)
        with started, Simulation(config, out_dir) as sim:  # leaving it stops the worker processes
            lines = 0
            if resume:
                restore_run(sim, checkpoint)
                lines = checkpoint.metrics_lines if checkpoint is not None else 0
                run.truncate_metrics(lines)
                log.info("resuming %s after round %d", out_dir, sim.round)
                changed = numerics_changes(checkpoint.numerics, numerics(sim.device)) if checkpoint is not None else []
                if changed:
                    log.warning("%s: resuming under other numerics than the checkpointed rounds (%s): the rounds "
                                "from here train validly but are not bit-identical to an uninterrupted run's",
                                out_dir, "; ".join(changed))
                run.remove_results()  # stale from here on; rewritten when the run ends or is stopped
                if sim.round >= config.c_rounds:
                    log.warning("%s has its %d rounds already; nothing to run (a larger --c_rounds extends it)",
                                out_dir, sim.round)
            write_config(out_dir, config)  # on resume: the same experiment, perhaps with a larger --c_rounds
            tracker = open_tracker(config.log, out_dir, config)
            bar = tqdm(total=config.c_rounds, initial=sim.round, desc="rounds", unit="round", disable=not progress)
            while sim.round < last_round and not stop:
                running["round"] = sim.round + 1  # the server counts a round done before its evaluation
                metrics = sim.run_round()
                run.append_metrics(metrics)
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
            if stop and not sim.round and not resume:  # before round 1: new_run() puts the folder back as it was
                raise RunInterrupted(stop["signum"], 0, out_dir)
        summary = summarize(config, read_metrics(out_dir), wall_time_s=sim.wall_time_s)
        run.write_summary(summary)
        plot_curves([out_dir], out_dir / CURVES)
        if tracker is not None:
            tracker.finish(out_dir / CURVES)
    if sim.round < last_round:
        raise RunInterrupted(stop["signum"], sim.round, out_dir)
    return summary
