"""Runs a whole experiment into an output directory: rounds, metrics, summary, curves."""

from __future__ import annotations

import logging
from pathlib import Path

from tqdm import tqdm

from lptfl.sim.config import RunConfig
from lptfl.sim.engine import Simulation
from lptfl.sim.results import CURVES, METRICS, SUMMARY, append_metrics, read_metrics, summarize, write_summary

log = logging.getLogger(__name__)


class OutputExistsError(Exception):
    """The output directory already holds a run."""


def prepare_output(out_dir: Path, *, overwrite: bool) -> None:
    """Create ``out_dir``; refuse one that holds results unless ``overwrite`` (then clear them)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    existing = [name for name in (METRICS, SUMMARY, CURVES) if (out_dir / name).exists()]
    if existing and not overwrite:
        raise OutputExistsError(
            f"{out_dir} already holds a run ({', '.join(existing)}); pass --overwrite to replace it "
            "or choose another --out"
        )
    for name in existing:
        (out_dir / name).unlink()


def run_experiment(config: RunConfig, out_dir: Path, *, overwrite: bool = False, progress: bool = True) -> dict:
    """Run ``config`` for ``config.c_rounds`` rounds, writing results into ``out_dir``.

    Returns:
        The summary (also written to ``out_dir/summary.json``).
    """
    from lptfl.report import plot_curves

    config.validate()
    out_dir = Path(out_dir)
    prepare_output(out_dir, overwrite=overwrite)
    sim = Simulation(config, out_dir)
    bar = tqdm(total=config.c_rounds, desc="rounds", unit="round", disable=not progress)
    while sim.round < config.c_rounds:
        metrics = sim.run_round()
        append_metrics(out_dir, metrics)
        bar.update(1)
        bar.set_postfix(acc=f"{metrics.test_accuracy:.4f}", loss=f"{metrics.train_loss:.3f}")
    bar.close()
    summary = summarize(config, read_metrics(out_dir), wall_time_s=sim.wall_time_s)
    write_summary(out_dir, summary)
    plot_curves([out_dir], out_dir / CURVES)
    return summary
