"""The ``lptfl`` command: ``lptfl run [flags]`` (the paper's flags), ``lptfl report DIR...``."""

from __future__ import annotations

import argparse
import difflib
import errno
import logging
import signal
import sys
import tempfile
import time
import traceback
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import fields
from pathlib import Path
from typing import NoReturn

from lptfl import __version__
from lptfl.experiment.allocator import keep_freed_memory
from lptfl.data import DatasetError
from lptfl.experiment.config import (
    CORE,
    GROUPS,
    OUTPUT,
    PUBLISHED_NO_OPS,
    RELIABILITY,
    ConfigError,
    RunConfig,
    field_kind,
    from_published,
    load_config_file,
    typed_values,
)
from lptfl.experiment.results import ACTIVATIONS, LAST_ROUNDS, METRICS
from lptfl.experiment.run_dir import CHECKPOINT, CONFIG
from lptfl.report import REPORT_FORMATS

log = logging.getLogger("lptfl")

_ARG_TYPES = {"int": int, "float": float, "str": str, "ints": int}
PUBLISHED_GROUP = "the published entry point's flags without effect here"


class _Parser(argparse.ArgumentParser):
    """An argument parser whose errors are one line, naming the nearest flag for an unknown one."""

    def error(self, message: str) -> NoReturn:
        if message.startswith("unrecognized arguments:"):
            flags = set(self._option_string_actions)
            for action in self._actions:
                if isinstance(action, argparse._SubParsersAction):
                    flags.update(*(sub._option_string_actions for sub in action.choices.values()))
            for word in message.partition(":")[2].split():
                close = difflib.get_close_matches(word.partition("=")[0], flags, n=1)
                message += f"; {word}: did you mean {close[0]}?" if close and word.startswith("-") else ""
        self.exit(2, f"lptfl: error: {message} (see {self.prog} --help)\n")


def _folder(text: str) -> Path:
    """An argparse type: a folder path (an empty one would be the current directory, unasked)."""
    if not text.strip():
        raise argparse.ArgumentTypeError("expected a folder path, got an empty string (for the current directory, "
                                         "say .)")
    return Path(text)


def _seconds(text: str) -> float:
    """An argparse type: a number of seconds > 0."""
    try:
        value = float(text)
    except ValueError:
        value = float("nan")
    if not value > 0:
        raise argparse.ArgumentTypeError(f"expected a number of seconds > 0, got {text!r}")
    return value


def _groups(parser: argparse.ArgumentParser) -> dict[str, argparse._ArgumentGroup]:
    """The --help groups of ``parser``, in order, by title."""
    return {title: parser.add_argument_group(title) for title in (*GROUPS, PUBLISHED_GROUP)}


def _add_setting_flags(groups: dict[str, argparse._ArgumentGroup], driver: str, *, skip: tuple[str, ...] = ()) -> None:
    """A flag per :class:`RunConfig` field that ``driver`` uses, in its group of ``groups`` (also under
    its published name; ``--no-X`` for a boolean; a choice's values as its metavar), and the published
    entry point's flags that change nothing here."""
    for f in fields(RunConfig):
        if f.name in skip or driver not in f.metadata["drivers"]:
            continue
        group, help_text = groups[f.metadata["group"]], f.metadata["help"]
        names = [f"--{f.name}", *([f"--{f.metadata['published']}"] if "published" in f.metadata else [])]
        if field_kind(f) == "bool":
            group.add_argument(*names, action=argparse.BooleanOptionalAction, help=help_text)
        else:
            choices = f.metadata.get("choices")
            group.add_argument(*names, dest=f.name, type=_ARG_TYPES[field_kind(f)],
                               metavar="{" + ",".join(choices) + "}" if choices else None,
                               help=f"{help_text} (default {f.default})")
    for name, (kind, _, why) in PUBLISHED_NO_OPS.items():
        help_text = f"no effect here: {why}"
        if kind == "bool":
            groups[PUBLISHED_GROUP].add_argument(f"--{name}", action=argparse.BooleanOptionalAction, help=help_text)
        else:
            groups[PUBLISHED_GROUP].add_argument(f"--{name}", type=_ARG_TYPES[kind],
                                                 nargs="+" if kind == "ints" else None, help=help_text)


def _run_parser(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    parser = sub.add_parser("run", help="run a federated experiment", argument_default=argparse.SUPPRESS,
                            usage="%(prog)s [flags]  (grouped below; a boolean's --no-X turns it off)")
    groups = _groups(parser)
    _add_setting_flags(groups, "sim")
    groups[CORE].add_argument("--config", type=Path, help="TOML file, or JSON file (*.json, the published entry "
                                                          "point's format) of flag values (flags given here override it)")
    groups[OUTPUT].add_argument("--out", type=_folder, help="output directory (default runs/<dataset>-<time>)")
    groups[OUTPUT].add_argument("--overwrite", action=argparse.BooleanOptionalAction,
                                help="replace the results already in --out")
    groups[OUTPUT].add_argument("--quiet", action=argparse.BooleanOptionalAction, help="no progress bar, warnings only")
    groups[RELIABILITY].add_argument("--resume", type=Path, metavar="DIR",
                                     help="continue the run in DIR from its checkpoint, with its saved config.json")
    groups[RELIABILITY].add_argument("--stop_after", type=int, metavar="ROUND",
                                     help="stop after this round with a checkpoint (exit 0); --resume continues the run")
    return parser


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="lptfl", description="Low-precision federated learning (NeurIPS 2024).")
    parser.add_argument("--version", action="version", version=f"lptfl {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    _run_parser(sub)
    _flower_local_parser(sub)
    report = sub.add_parser("report", help="paper-style table and curves of several runs")
    report.add_argument("runs", nargs="+", type=Path,
                        help="run directories, or folders of them (their subfolders that hold a metrics.jsonl)")
    report.add_argument("--plot", type=Path, help="save the curves of all runs here (the format of its suffix, else PNG)")
    report.add_argument("--format", default="markdown", choices=REPORT_FORMATS,
                        help="markdown (the paper-style table), csv (one row per run) or json (rows with their "
                             "accuracy curves) (default markdown)")
    compare = sub.add_parser("compare", help="whether a rerun retraces a run: rounds equal in all fields but timings "
                                             "(exit 0 if every shared round is, 1 if not)")
    compare.add_argument("reference", type=Path, help="run directory")
    compare.add_argument("candidate", type=Path, help="run directory, e.g. the same command run again")
    return parser


def config_from_args(args: argparse.Namespace) -> RunConfig:
    """Defaults, then the config file, then the flags given on the command line (checked)."""
    values, origin = _given_values(args)
    config = RunConfig.from_dict(values)
    with _said_of(origin):
        config.validate()
    return config


def _given_values(args: argparse.Namespace) -> tuple[dict, dict[str, str]]:
    """The settings given by the config file and the flags (not the defaults), and for each one
    from the file, the file's name."""
    config_file = getattr(args, "config", None)
    values = load_config_file(config_file) if config_file is not None else {}
    origin = dict.fromkeys(values, str(config_file))
    flags = {k: v for k, v in vars(args).items() if k in RunConfig.__dataclass_fields__ or k in PUBLISHED_NO_OPS}
    flags = typed_values(from_published(flags))
    for key in flags:
        origin.pop(key, None)
    return {**values, **flags}, origin


@contextmanager
def _said_of(origin: dict[str, str]) -> Iterator[None]:
    """Say a :class:`ConfigError` of the body of the file its value came from (``origin``: key -> file)."""
    try:
        yield
    except ConfigError as err:
        if err.source is None and err.key in origin:
            raise err.at(origin[err.key]) from None
        raise


def _command_run(args: argparse.Namespace) -> int:
    from lptfl.sim.runner import RunInterrupted, run_experiment
    from lptfl.sim.workers import launched_rank, serve

    if (launched_rank() or (0, 1))[0] > 0:  # a torchrun rank other than 0: rank 0 runs the experiment
        serve()
        return 0
    started = time.perf_counter()

    resume = getattr(args, "resume", None)
    out = getattr(args, "out", None)
    if resume is not None:
        from lptfl.experiment.checkpoint import resume_config

        if out is not None and Path(out).resolve() != Path(resume).resolve():
            raise ValueError(f"--out {out} and --resume {resume} name different directories")
        if getattr(args, "overwrite", False):
            raise ValueError("--overwrite and --resume exclude each other")
        values, origin = _given_values(args)
        with _said_of(origin):
            config, out = resume_config(resume, values), Path(resume)
    else:
        config = config_from_args(args)
    if out is None:
        out = Path("runs") / f"{config.dataset}-{time.strftime('%Y%m%d-%H%M%S')}"
    try:
        summary = run_experiment(
            config, out, overwrite=getattr(args, "overwrite", False), progress=not getattr(args, "quiet", False),
            resume=resume is not None, stop_after=getattr(args, "stop_after", None),
        )
    except RunInterrupted as err:
        print(f"lptfl: {err}", file=sys.stderr)
        return 128 + err.signum
    head = "final accuracy" if summary["rounds"] >= config.c_rounds else (
        f"paused after round {summary['rounds']} of {config.c_rounds} (continue with: lptfl run --resume {out}); "
        "accuracy")
    print(f"{head} {_final_accuracy(summary)}; {_totals(summary, started)}; results in {out}")
    return 0


def _totals(summary: dict, started: float) -> str:
    """Bytes both ways and the time since ``started`` (``time.perf_counter()``; set-up included),
    with the rounds' share, for the final line."""
    return (f"uplink {summary['bytes_up_total']} B, downlink {summary['bytes_down_total']} B; "
            f"{time.perf_counter() - started:.1f} s with set-up ({summary['wall_time_s']:.1f} s in rounds)")


def _final_accuracy(summary: dict) -> str:
    """A summary's test accuracy for the terminal (fractions 0-1): mean +- std over the last 5
    evaluated rounds, then the means of both named scores (docs/evaluation.md)."""
    if summary["final_accuracy_mean"] is None:
        return "not evaluated yet"
    means = {name: summary.get(f"final_accuracy_{name}_mean") for name in ACTIVATIONS}
    named = ", ".join(f"{name.replace('_', ' ')}. {mean:.4f}" for name, mean in means.items() if mean is not None)
    window = min(LAST_ROUNDS, summary.get("evaluated_rounds", LAST_ROUNDS))
    rounds = "the only evaluated round" if window == 1 else f"last {window} evaluated rounds"
    return f"{summary['final_accuracy_mean']:.4f} +- {summary['final_accuracy_std']:.4f} ({rounds}; {named})"


def _have_metrics(run_dirs: list[Path]) -> bool:
    """Whether every run directory holds a ``metrics.jsonl``; names those that do not on stderr."""
    missing = [str(d) for d in run_dirs if not (d / METRICS).exists()]
    if missing:
        print(f"lptfl: error: no {METRICS} in {', '.join(missing)}", file=sys.stderr)
    return not missing


def _runs_in(paths: list[Path]) -> list[Path]:
    """Each path that is a run directory, and the run directories directly inside it (sorted; hidden ones,
    such as a run set aside by ``--overwrite``, left out); a path that is neither stays, for
    :func:`_have_metrics` to name."""
    found = []
    for path in paths:
        inside = sorted(metrics.parent for metrics in path.glob(f"[!.]*/{METRICS}"))
        found += ([path] if (path / METRICS).exists() or not inside else []) + inside
    return list(dict.fromkeys(found))


def _command_report(args: argparse.Namespace) -> int:
    from lptfl.report import plot_curves, readable_rows, report

    runs = _runs_in(args.runs)
    if not _have_metrics(runs):
        return 2
    rows = readable_rows(runs)  # a damaged run among several is skipped with a warning
    print(report(list(rows.values()), args.format), end="")
    if args.plot is not None:
        print(f"curves saved to {plot_curves(list(rows), args.plot)}")
    return 0 if len(rows) == len(runs) else 1 if rows else 2


def _command_compare(args: argparse.Namespace) -> int:
    from lptfl.experiment.results import compare_rounds, read_metrics

    if not _have_metrics([args.reference, args.candidate]):
        return 2
    result = compare_rounds(read_metrics(args.reference), read_metrics(args.candidate))
    print(f"rounds: {result.reference_rounds} in {args.reference}, {result.candidate_rounds} in {args.candidate}, "
          f"{result.compared} in both; identical in all fields but timings: {result.identical} of {result.compared}")
    changed = _setting_changes(args.reference, args.candidate)
    if changed:
        print(f"the runs' settings differ: {'; '.join(changed)}")
    if not result.compared:
        print("no round in common: nothing to compare")
        return 1
    if result.first_difference is not None:
        round_number, fields = result.first_difference
        print(f"first difference: round {round_number} ({', '.join(fields)})")
        return 1
    return 0


def _setting_changes(reference: Path, candidate: Path) -> list[str]:
    """The settings of two run folders that change results and differ (``--name a -> b``); empty when
    either has no ``config.json``."""
    from lptfl.experiment.checkpoint import read_config

    if not all((Path(run) / CONFIG).exists() for run in (reference, candidate)):
        return []
    a, b = read_config(reference).to_dict(), read_config(candidate).to_dict()
    resumable = RunConfig.resumable()
    return [f"--{name} {a[name]!r} -> {b[name]!r}" for name in a if a[name] != b[name] and name not in resumable]


def _flower_local_parser(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser("flower-local", argument_default=argparse.SUPPRESS,
                            usage="%(prog)s --out DIR [flags]  (grouped below; a boolean's --no-X turns it off)",
                            help="run on a local Flower federation (SuperLink + SuperNodes on 127.0.0.1)")
    groups = _groups(parser)
    flower = parser.add_argument_group("the local federation")
    flower.add_argument("--supernodes", type=int, default=2, help="SuperNodes, one data partition each (default 2)")
    flower.add_argument("--insecure", action=argparse.BooleanOptionalAction,
                        help="run without TLS (default: TLS with a throwaway CA made by openssl, since any local "
                             "user can reach an unauthenticated SuperLink on loopback)")
    flower.add_argument("--flwr-home", type=Path, help="FLWR_HOME and process logs (default: a temporary directory)")
    flower.add_argument("--timeout", type=_seconds, default=3600.0, help="seconds before the run is stopped (default 3600)")
    flower.add_argument("--round-timeout", type=float, default=600.0,
                        help="seconds a round waits for replies; late or dead nodes are counted as failed (default 600; 0: no limit)")
    groups[CORE].add_argument("--rounds", type=int, help="communication rounds (same as --c_rounds)")
    groups[CORE].add_argument("--config", type=Path, help="TOML file, or JSON file (*.json, the published entry "
                                                          "point's format) of flag values (flags given here override it)")
    groups[OUTPUT].add_argument("--out", type=_folder, required=True, help="output directory")
    groups[OUTPUT].add_argument("--overwrite", action=argparse.BooleanOptionalAction,
                                help="replace the results already in --out")
    groups[OUTPUT].add_argument("--quiet", action=argparse.BooleanOptionalAction, help="warnings only")
    _add_setting_flags(groups, "flower", skip=("num_clients",))  # num_clients is --supernodes


def _command_flower_local(args: argparse.Namespace) -> int:
    from dataclasses import replace

    from lptfl.flower.config import FlowerOptions
    from lptfl.flower.local import FlowerRunError, local_security, run_local
    from lptfl.experiment.setup import check_device
    from lptfl.experiment.checkpoint import write_config
    from lptfl.experiment.run_dir import RunDirectory
    from lptfl.sim.stop_signals import stop_signals_to

    config = replace(config_from_args(args), num_clients=args.supernodes)
    if getattr(args, "rounds", None) is not None:
        config = replace(config, c_rounds=args.rounds)
    config.validate()
    config.warn_unused()
    check_device(config.device)
    options = FlowerOptions(round_timeout=args.round_timeout)
    options.validate()
    started = time.perf_counter()
    # Both stop the federation, also where a shell started this command with SIGINT ignored
    # (a background job), as they stop `lptfl run`. A run that fails before its first round leaves
    # the folder as it was (RunDirectory.new_run).
    with stop_signals_to(_stop_federation), tempfile.TemporaryDirectory(prefix="lptfl-certs-") as certs:
        try:
            with RunDirectory(args.out).new_run(overwrite=getattr(args, "overwrite", False)):
                write_config(args.out, config)
                tls = local_security(Path(certs), insecure=getattr(args, "insecure", False))
                summary = run_local(config, args.out, supernodes=args.supernodes,
                                    home=getattr(args, "flwr_home", None), tls=tls, timeout=args.timeout,
                                    options=options)
        except FlowerRunError as err:
            print(f"lptfl: flower run failed: {err}", file=sys.stderr)
            return 1
        except KeyboardInterrupt:
            print("lptfl: interrupted; the local federation was stopped", file=sys.stderr)
            return 130
    from lptfl.experiment.results import CURVES
    from lptfl.report import plot_curves

    plot_curves([args.out], args.out / CURVES)
    print(f"final accuracy {_final_accuracy(summary)}; {_totals(summary, started)}; results in {args.out} "
          f"(Flower, {args.supernodes} SuperNodes)")
    return 0


def _stop_federation(signum: int, frame: object) -> None:
    """SIGINT stops ``flower-local`` as Ctrl-C does (exit 130); SIGTERM with exit 143."""
    if signum == signal.SIGTERM:
        sys.exit(143)
    raise KeyboardInterrupt


def main(argv: list[str] | None = None) -> int:
    """Run the ``lptfl`` command. A user's mistake ends in one line ``lptfl: error: ...`` and exit 2;
    an unexpected error in one line naming a log file that holds its traceback, and exit 1."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0].startswith("-") and argv[0] not in ("--help", "-h", "--version"):
        argv = ["run", *argv]  # the published entry point's style: flags only (a single dash: run's parser says so)
    args = build_parser().parse_args(argv)
    quiet = getattr(args, "quiet", False)
    logging.basicConfig(level=logging.WARNING if quiet else logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    keep_freed_memory()
    try:
        if args.command == "run":
            return _command_run(args)
        if args.command == "flower-local":
            return _command_flower_local(args)
        if args.command == "compare":
            return _command_compare(args)
        return _command_report(args)
    except (ValueError, DatasetError, OSError) as err:
        folder = _run_folder(args)
        if isinstance(err, OSError) and err.filename is None and err.errno in _WRITE_ERRNOS and folder is not None:
            resume = _resume_command(args)
            then = f"continue with: {resume}" if resume else "run the command again"
            err = OSError(err.errno, f"{err.strerror} while writing into {folder}; free space there, then {then}")
        print(f"lptfl: error: {_one_line(err)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:  # a second stop signal, or Ctrl-C before a run handles signals
        resume = _resume_command(args)
        print(f"lptfl: stopped at once{f'; continue from its last checkpoint with: {resume}' if resume else ''}",
              file=sys.stderr)
        return 130
    except Exception as err:  # a bug, not the user's mistake
        log_path = _save_traceback(argv)
        print(f"lptfl: internal error: {type(err).__name__}: {_one_line(err)} (traceback in {log_path}; "
              "please report it)", file=sys.stderr)
        return 1


def _run_folder(args: argparse.Namespace) -> Path | None:
    """The run folder the command writes into (``--resume`` or ``--out``), if any."""
    folder = getattr(args, "resume", None) or getattr(args, "out", None)
    return None if folder is None else Path(folder)


def _resume_command(args: argparse.Namespace) -> str | None:
    """``lptfl run --resume DIR`` where an ``lptfl run`` has a checkpoint to continue from, else None."""
    folder = _run_folder(args)
    if args.command != "run" or folder is None or not (folder / CHECKPOINT).exists():
        return None
    return f"lptfl run --resume {folder}"


_WRITE_ERRNOS = (errno.ENOSPC, errno.EDQUOT)  # a write that found no room: the message names no file


def _one_line(err: BaseException) -> str:
    return " ".join(str(err).split())


def _save_traceback(argv: list[str]) -> Path:
    """Write the command and the traceback being handled to a new log file; its path."""
    with tempfile.NamedTemporaryFile("w", prefix="lptfl-error-", suffix=".log", delete=False) as handle:
        handle.write(f"lptfl {' '.join(argv)}\n{traceback.format_exc()}")
    return Path(handle.name)


if __name__ == "__main__":
    sys.exit(main())
