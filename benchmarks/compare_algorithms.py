"""Compare the FL algorithms at 8-bit with the moving average vs 32-bit without it (REFERENCE §6).

Run (CPU, hours; resumable like reproduce_paper.py):
    python benchmarks/compare_algorithms.py --data_path ../shared/data --rounds 2 --parallel 2

The paper's Fashion-MNIST setting (80 clients, 32 per round, alpha 0.01, ConvNet, 1 epoch, batch 32,
Adam 1e-3) for each ``--aggregation_mode`` in ``--modes``, as ``q8-avg`` and ``fp32-noavg``, one
folder per run under ``<out>/<mode>-<config>/``; FedBN uses the ConvNet with batch norm (the
others the paper's instance norm). ``<out>/table.md`` lists the mean +- std of the last 5 rounds
(fewer when fewer rounds ran) beside the paper's numbers (its runs had 200 rounds), and
``<out>/curves.png`` plots every run.
"""

from __future__ import annotations

import argparse
import logging
import math
from pathlib import Path

from reproduce_paper import CONFIGS, PAPER_SETTING

from lptfl.experiment.results import read_metrics
from lptfl.sim.grid import GridRun, run_grid
from lptfl.report import describe, plot_curves, table

MODES = ("fedavg", "fedprox", "abavg", "fedgen", "fedftg", "fedbn")
COMPARED = ("q8-avg", "fp32-noavg")
# The paper's §6 table, FMNIST alpha 0.01: mode -> (8-bit w avg, 32-bit w/o avg), test accuracy %.
PAPER = {"fedavg": (80.1, 79.5), "fedprox": (83.0, 81.1), "abavg": (80.7, 78.4), "fedgen": (79.9, 80.2),
         "fedftg": (82.0, 80.6)}
MODE_FLAGS = {"fedbn": ["--model_norm", "batchnorm"]}


def run_dirs(out: Path) -> list[Path]:
    """Every comparison run with results under ``out``, in table order."""
    return [out / f"{m}-{c}" for m in MODES for c in COMPARED if (out / f"{m}-{c}" / "metrics.jsonl").exists()]


def write_table(out: Path, alpha: float) -> None:
    """``table.md`` from every run under ``out`` (whichever invocation ran it)."""
    rows = ["| algorithm | rounds | 8-bit w/ avg (%) | 32-bit w/o avg (%) | after round 1: 8-bit w/ avg vs 32-bit w/o avg (%) "
            "| paper, 200 rounds (8-bit w/ avg vs 32-bit w/o avg) |",
            "| --- | --- | --- | --- | --- | --- |"]
    for mode in dict.fromkeys(d.name.rsplit("-", 2)[0] for d in run_dirs(out)):
        cells, first, rounds = [], [], set()
        for config in COMPARED:
            run_dir = out / f"{mode}-{config}"
            if (run_dir / "metrics.jsonl").exists():
                row = describe(run_dir)
                rounds.add(row["rounds"])
                cells.append("-" if math.isnan(row["mean"]) else f"{row['mean']:.1f} +- {row['std']:.1f}")
                scored = row["curve"][0] if row["curve"] else math.nan  # round 1's accuracy (%), NaN: not scored
                first.append("-" if math.isnan(scored) else f"{scored:.1f}")
            else:
                cells.append("-")
                first.append("-")
        paper = PAPER.get(mode)
        paper_text = f"{paper[0]:.1f} vs {paper[1]:.1f}" if paper else "- (not in the paper's table)"
        rounds_text = "/".join(str(r) for r in sorted(rounds)) or "0"
        rows.append(f"| {mode} | {rounds_text} | {cells[0]} | {cells[1]} | {first[0]} vs {first[1]} | {paper_text} |")
    (out / "table.md").write_text(
        f"# FL algorithms on Fashion-MNIST, alpha {alpha}: test accuracy of the served model\n\n"
        "Mean +- std over the last 5 rounds run (all of them when fewer). The paper's figures come from\n"
        "200 rounds; ours from the rounds listed, so they show the start of training only.\n\n"
        + "\n".join(rows) + "\n\n## Runs\n\n" + table(run_dirs(out))
        + "\n\n## Seconds per round (two or more runs shared the 2 CPU cores)\n\n" + round_times(out) + "\n")


def round_times(out: Path) -> str:
    """Seconds per round of each run (the runs shared the CPU, so compare them with care)."""
    lines = ["| run | round times (s) |", "| --- | --- |"]
    for run_dir in run_dirs(out):
        times = ", ".join(f"{r['round_time_s']:.0f}" if "round_time_s" in r else "?" for r in read_metrics(run_dir))
        lines.append(f"| {run_dir.name} | {times} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data_path", default="../shared/data")
    parser.add_argument("--out", type=Path, default=Path("results/algorithms"))
    parser.add_argument("--modes", default=",".join(MODES))
    parser.add_argument("--alpha", type=float, default=0.01)
    parser.add_argument("--rounds", type=int, default=200)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--parallel", type=int, default=1, help="runs at once (they share the CPU threads)")
    parser.add_argument("--table_only", action="store_true", help="only rewrite table.md and curves.png")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    args.out.mkdir(parents=True, exist_ok=True)
    runs = []
    for mode in args.modes.split(","):
        if mode not in MODES:
            raise SystemExit(f"unknown mode {mode!r}; expected one of {', '.join(MODES)}")
        for config in COMPARED:
            flags = [*PAPER_SETTING, *CONFIGS[config], *MODE_FLAGS.get(mode, []), "--aggregation_mode", mode,
                     "--alpha", str(args.alpha), "--data_path", args.data_path, "--device", args.device]
            runs.append(GridRun(args.out / f"{mode}-{config}", tuple(flags)))

    def refresh() -> None:
        present = run_dirs(args.out)
        if present:
            write_table(args.out, args.alpha)
            plot_curves(present, args.out / "curves.png")

    if args.table_only:
        if not run_dirs(args.out):
            raise SystemExit(f"no comparison run with metrics in {args.out}")
        refresh()
        print((args.out / "table.md").read_text())
        return
    try:
        run_grid(runs, args.rounds, parallel=args.parallel, after_each=refresh)
    finally:
        refresh()


if __name__ == "__main__":
    main()
