"""Test accuracy of runs side by side in windows of rounds, for paired comparisons.

Run: ``python benchmarks/window_means.py RUN_DIR [RUN_DIR ...] [--window 10] [--rounds 120]``

Prints a Markdown table (one row per run: the mean test accuracy, %, of each window of
``--window`` evaluated rounds up to ``--rounds``; "-" where a run has not reached the window's end),
then each run's last 5 rounds (mean +- std, %) with both scores where the run kept them.
"""

from __future__ import annotations

import argparse
import statistics
from pathlib import Path

from lptfl.experiment.results import METRICS, read_metrics
from lptfl.report import run_label


def window_row(rows: list[dict], window: int, rounds: int) -> list[str]:
    """Mean test accuracy (%) of each full window of rounds ("-" for a window the run has not finished)."""
    by_round = {r["round"]: r["test_accuracy"] for r in rows if r.get("test_accuracy") is not None}
    cells = []
    for first in range(1, rounds + 1, window):
        values = [by_round[r] for r in range(first, first + window) if r in by_round]
        done = max(by_round, default=0) >= first + window - 1
        cells.append(f"{100 * statistics.mean(values):.1f}" if done and values else "-")
    return cells


def last_rounds(rows: list[dict]) -> str:
    """The last 5 evaluated rounds: test_accuracy mean +- std (%), and both named scores if kept."""
    last = [r for r in rows if r.get("test_accuracy") is not None][-5:]
    if not last:
        return "no evaluated round yet"
    acc = [100 * r["test_accuracy"] for r in last]
    text = f"rounds {last[0]['round']}-{last[-1]['round']}: {statistics.mean(acc):.1f} +- {statistics.pstdev(acc):.1f}"
    both = [(r.get("test_accuracy_fp32_act"), r.get("test_accuracy_policy_act")) for r in last]
    if all(f is not None and p is not None for f, p in both):
        text += (f" (fp32 act. {100 * statistics.mean(f for f, _ in both):.1f}, "
                 f"policy act. {100 * statistics.mean(p for _, p in both):.1f})")
    return text


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs", nargs="+", type=Path)
    parser.add_argument("--window", type=int, default=10)
    parser.add_argument("--rounds", type=int, default=120)
    args = parser.parse_args()
    if args.window < 1 or args.rounds < 1:
        parser.error(f"--window {args.window} and --rounds {args.rounds}: expected integers >= 1")
    missing = [str(run) for run in args.runs if not (run / METRICS).is_file()]
    if missing:
        parser.error(f"no {METRICS} in {', '.join(missing)}: expected run folders")
    labels = [run_label(run) for run in args.runs]
    if len(set(labels)) < len(labels):  # two folders of one name: tell them apart by their parents
        labels = [str(run) for run in args.runs]
    try:
        runs = {label: read_metrics(run) for label, run in zip(labels, args.runs)}
    except ValueError as err:
        parser.error(str(err))
    heads = [f"{first}-{first + args.window - 1}" for first in range(1, args.rounds + 1, args.window)]
    print("| run | rounds | " + " | ".join(heads) + " |")
    print("| --- | --- | " + " | ".join("---" for _ in heads) + " |")
    for name, rows in runs.items():
        print(f"| {name} | {len(rows)} | " + " | ".join(window_row(rows, args.window, args.rounds)) + " |")
    print()
    for name, rows in runs.items():
        if rows:
            print(f"- {name}: {last_rounds(rows)}")


if __name__ == "__main__":
    main()
