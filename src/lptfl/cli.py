"""The ``lptfl`` command: ``lptfl run [flags]`` (the paper's flags), ``lptfl report DIR...``."""

from __future__ import annotations

import argparse
import logging
import sys
import tomllib
from dataclasses import fields
from pathlib import Path

from lptfl.data import DatasetError
from lptfl.sim.config import RunConfig

log = logging.getLogger("lptfl")

_HELP = {
    "dataset": "digits (embedded, default), mnist, fmnist, cifar10, cifar100, cinic10",
    "data_path": "directory holding the dataset files (torchvision layout for MNIST/FMNIST)",
    "download": "download missing dataset files from the official locations (checksummed)",
    "alpha": "Dirichlet concentration of the class split",
    "partition": "dirichlet (balanced, the paper's), dirichlet-plain, iid",
    "model_name": "ConvNet, MLP, resnet8, resnet18",
    "model_width": "ConvNet channels / MLP hidden units (0: the paper's 128)",
    "c_rounds": "communication rounds",
    "num_clients": "clients in the federation",
    "frac": "fraction of clients sampled per round, in (0, 1]",
    "epochs": "local epochs per round",
    "use_quantization": "low-precision local training and communication",
    "quantization_bits": "word length of weights, activations, gradients, errors (sign included)",
    "block_dim": "exponent layout of weights and gradients: BC, B or tensor",
    "small_block": "FC, Conv or None: which small tensors use one exponent",
    "quant_type": "stochastic or nearest rounding",
    "use_mixed_precision": "separate word lengths from --weight/activation/grad_quantization_bits",
    "moving_average": "keep the server moving average and serve it (the paper's paradigm)",
    "moving_weight": "lambda of the moving average",
    "ma_start": "first round entering the moving average",
    "aggregation_mode": "FL algorithm",
    "aggregation_weighting": "uniform (published code) or samples (weighted by client data size)",
    "client_state": "client optimizer state: auto, memory, disk (spilled under --out), none (fresh each round)",
    "compile": "torch.compile the training step: auto (on for low precision), on, off",
    "compute": "auto, bf16 (exact bf16 products on a <=8-bit grid), fp32",
    "device": "cpu or cuda",
    "compress": "zstd on the payloads (lossless)",
}


def _run_parser(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    parser = sub.add_parser("run", help="run a federated experiment", argument_default=argparse.SUPPRESS)
    for f in fields(RunConfig):
        flag = f"--{f.name}"
        if f.type in ("bool", bool):
            parser.add_argument(flag, action="store_true", help=_HELP.get(f.name))
        else:
            kind = {"int": int, "float": float, "str": str}[f.type if isinstance(f.type, str) else f.type.__name__]
            parser.add_argument(flag, type=kind, help=f"{_HELP.get(f.name, '')} (default {f.default})".strip())
    parser.add_argument("--config", type=Path, help="TOML file of flag values (flags given here override it)")
    parser.add_argument("--out", type=Path, help="output directory (default runs/<dataset>-<time>)")
    parser.add_argument("--overwrite", action="store_true", help="replace the results already in --out")
    parser.add_argument("--quiet", action="store_true", help="no progress bar, warnings only")
    return parser


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="lptfl", description="Low-precision federated learning (NeurIPS 2024).")
    sub = parser.add_subparsers(dest="command", required=True)
    _run_parser(sub)
    report = sub.add_parser("report", help="paper-style table and curves of several runs")
    report.add_argument("runs", nargs="+", type=Path, help="run directories")
    report.add_argument("--plot", type=Path, help="save the curves of all runs here (PNG)")
    return parser


def config_from_args(args: argparse.Namespace) -> RunConfig:
    """Defaults, then the TOML file, then the flags given on the command line."""
    values: dict = {}
    config_file = getattr(args, "config", None)
    if config_file is not None:
        with open(config_file, "rb") as handle:
            values.update(tomllib.load(handle))
    names = {f.name for f in fields(RunConfig)}
    values.update({k: v for k, v in vars(args).items() if k in names})
    return RunConfig.from_dict(values)


def _command_run(args: argparse.Namespace) -> int:
    from lptfl.sim.runner import OutputExistsError, run_experiment

    config = config_from_args(args)
    config.validate()
    out = getattr(args, "out", None)
    if out is None:
        import time

        out = Path("runs") / f"{config.dataset}-{time.strftime('%Y%m%d-%H%M%S')}"
    try:
        summary = run_experiment(
            config, out, overwrite=getattr(args, "overwrite", False), progress=not getattr(args, "quiet", False)
        )
    except OutputExistsError as err:
        print(f"lptfl: {err}", file=sys.stderr)
        return 2
    print(
        f"final accuracy {summary['final_accuracy_mean']:.4f} +- {summary['final_accuracy_std']:.4f} "
        f"(last 5 rounds); uplink {summary['bytes_up_total']} B, downlink {summary['bytes_down_total']} B; "
        f"{summary['wall_time_s']:.1f} s; results in {out}"
    )
    return 0


def _command_report(args: argparse.Namespace) -> int:
    from lptfl.report import plot_curves, table

    missing = [str(d) for d in args.runs if not (d / "metrics.jsonl").exists()]
    if missing:
        print(f"lptfl: no metrics.jsonl in {', '.join(missing)}", file=sys.stderr)
        return 2
    print(table(args.runs), end="")
    if args.plot is not None:
        plot_curves(args.runs, args.plot)
        print(f"curves saved to {args.plot}")
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0].startswith("--") and argv[0] not in ("--help", "-h"):
        argv = ["run", *argv]  # the published entry point's style: flags only
    args = build_parser().parse_args(argv)
    quiet = getattr(args, "quiet", False)
    logging.basicConfig(level=logging.WARNING if quiet else logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        if args.command == "run":
            return _command_run(args)
        return _command_report(args)
    except (ValueError, DatasetError) as err:
        print(f"lptfl: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
