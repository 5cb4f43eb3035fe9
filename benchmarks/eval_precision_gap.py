"""Score a run's served model both ways: with the run's activation format and with fp32 activations.

The published code scores its moving-average runs with fp32 activations and its runs without the
average with their 8-bit activation quantizers; ``lptfl run`` scores every run with the run's own
format unless ``--eval_precision full``. This script measures what that choice is worth on one
model: it loads the checkpoint of each run folder given (the server moving average if the run
keeps one, else the global model) and evaluates it on the full test set under both.

    python benchmarks/eval_precision_gap.py RUN_DIR [RUN_DIR ...] [--data_path DIR] [--threads N]
        [--test_batch_size B]

Prints one line per run: round, which model, test accuracy (%) and loss (nats) under each, and the
accuracy gap full - policy in points. Activation exponents are shared per tensor, i.e. per test
batch, so the batch size matters to the ``policy`` score: ``--test_batch_size`` (default: the run's
own) measures how much.
"""

from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path

import torch

from lptfl.data import load_dataset
from lptfl.experiment.setup import build_run_model
from lptfl.fl import evaluate
from lptfl.experiment.checkpoint import CheckpointError, load_checkpoint, read_config


def score(run_dir: Path, datasets: dict, data_path: str | None, test_batch_size: int | None = None) -> str:
    """One result line for the run in ``run_dir`` (see the module docstring); ``datasets`` caches
    the datasets loaded so far by (name, path), so runs on the same data load it once."""
    config = read_config(run_dir)
    checkpoint = load_checkpoint(run_dir)
    if checkpoint is None:
        raise CheckpointError(f"{run_dir} has no checkpoint to score")
    key = (config.dataset, data_path or config.data_path)
    if key not in datasets:
        datasets[key] = load_dataset(*key, download=False)
    data = datasets[key]
    served, which = ((checkpoint.average_state, "average") if checkpoint.average_state
                     else (checkpoint.global_state, "global"))
    example = data.train_x[: config.batch_size]
    batch_size = test_batch_size or config.test_batch_size
    results = {}
    for precision in ("policy", "full"):
        model = build_run_model(config, data)
        dataclasses.replace(config, eval_precision=precision).eval_policy().prepare_model(model, example)
        model.load_state_dict(served)
        results[precision] = evaluate(model, data.test_x, data.test_y, batch_size=batch_size)
    (policy_loss, policy_acc), (full_loss, full_acc) = results["policy"], results["full"]
    return (f"{run_dir.name} round {checkpoint.round} ({which} model, test batch {batch_size}): "
            f"policy {100 * policy_acc:.2f}% (loss {policy_loss:.4f}), full {100 * full_acc:.2f}% (loss {full_loss:.4f}); "
            f"full - policy {100 * (full_acc - policy_acc):+.2f} points")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs", nargs="+", type=Path, help="run folders holding config.json and a checkpoint")
    parser.add_argument("--data_path", default=None, help="where the dataset is (default: the run's own)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--test_batch_size", type=int, default=None, help="default: the run's own")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    datasets: dict = {}
    for run_dir in args.runs:
        print(score(run_dir, datasets, args.data_path, args.test_batch_size))


if __name__ == "__main__":
    main()
