"""Paper-style tables and curves from run directories."""

from __future__ import annotations

import csv
import io
import json
import logging
import math
import os
import reprlib
import statistics
from collections.abc import Mapping, Sequence
from pathlib import Path

from lptfl.experiment.config import SAVED_DEFAULTS, scored_activations
from lptfl.experiment.results import ACTIVATIONS, LAST_ROUNDS, CURVES, SUMMARY, final_accuracy, read_metrics
from lptfl.experiment.run_dir import CONFIG

log = logging.getLogger(__name__)


def run_label(run_dir: Path) -> str:
    """A short label for a run: its folder name (of the absolute path: ``.`` is the working folder's)."""
    return Path(os.path.abspath(run_dir)).name


def _saved_settings(run_dir: Path) -> dict | None:
    """A run's settings as saved in ``summary.json`` (a finished run), else in ``config.json`` (a run going
    on or interrupted); None when neither file exists.

    Raises:
        ValueError: the file is not JSON or holds no object of settings (naming the file).
    """
    for path, key in ((run_dir / SUMMARY, "config"), (run_dir / CONFIG, None)):
        if not path.exists():
            continue
        try:
            saved = json.loads(path.read_text(encoding="utf-8", errors="replace"))
        except json.JSONDecodeError as err:
            raise ValueError(f"{path} is not JSON ({err.msg} at line {err.lineno}), expected lptfl's {path.name}") \
                from None
        settings = saved.get(key) if key and isinstance(saved, dict) else saved
        if not isinstance(settings, dict):
            raise ValueError(f"{path} holds {reprlib.repr(saved)}, expected a JSON object"
                             f"{' with a config object' if key else ''}")
        return settings
    return None


def describe(run_dir: Path) -> dict:
    """Precision, averaging, alpha and final accuracy of one run: ``mean`` +- ``std`` (%) of the last 5
    evaluated rounds' ``test_accuracy`` (scored with ``scored_with``: ``"fp32_act"`` or ``"policy_act"``),
    ``mean_fp32_act`` and ``mean_policy_act`` (%, None when the run's lines do not tell, see
    :func:`lptfl.experiment.results.round_accuracy`), and its test accuracy (%) by round under ``curve``
    (round 1 first; NaN for a round not evaluated)."""
    run_dir = Path(run_dir)
    rounds, saved = read_metrics(run_dir), _saved_settings(run_dir)
    config = {**SAVED_DEFAULTS, **(saved or {})}
    curve = [math.nan if r.get("test_accuracy") is None else 100 * r["test_accuracy"] for r in rounds]
    mean, std = final_accuracy(rounds, config)
    named = {f"mean_{name}": None if (m := final_accuracy(rounds, config, name)[0]) is None else 100 * m
             for name in ACTIVATIONS}
    bits = config.get("quantization_bits", 32) if config.get("use_quantization") else 32
    unknown = dict.fromkeys(("precision", "averaging", "scored_with"), "?") if saved is None else {}  # no defaults
    return {
        "run": run_label(run_dir),
        "dataset": config.get("dataset", "?"),
        "alpha": config.get("alpha", "?"),
        "precision": f"{bits} bit",
        "averaging": "w avg" if config.get("moving_average") else "w/o avg",
        "rounds": len(rounds),
        "mean": math.nan if mean is None else 100 * mean,
        "std": 100 * std,
        "scored_with": scored_activations(config["eval_precision"], config.get("moving_average", False)),
        **unknown,
        **named,
        "bytes_up_per_round": (sum(r["bytes_up"] for r in rounds) / len(rounds)) if rounds else 0,
        "curve": curve,
    }


def table(run_dirs: Sequence[Path]) -> str:
    """A Markdown table: one row per run, test accuracy (%) as mean +- std over the last 5 evaluated
    rounds, and both named scores' means."""
    return rows_table([describe(d) for d in run_dirs])


REPORT_FORMATS = ("markdown", "csv", "json")
# the columns of the csv format: a describe() row's keys, the curve left out
_CSV_COLUMNS = ("run", "dataset", "alpha", "averaging", "precision", "rounds", "mean", "std", "scored_with",
                *(f"mean_{name}" for name in ACTIVATIONS), "bytes_up_per_round")


def readable_rows(run_dirs: Sequence[Path]) -> dict[Path, dict]:
    """Each run's :func:`describe` row, by run; of several runs, one whose files are damaged is left out
    with a warning naming the file and the problem.

    Raises:
        ValueError: the only run's files are damaged.
    """
    rows = {}
    for run_dir in run_dirs:
        try:
            rows[run_dir] = describe(run_dir)
        except (ValueError, OSError) as err:
            if len(run_dirs) == 1:
                raise
            log.warning("skipping %s: %s", run_dir, err)
    return rows


def report(rows: Sequence[dict], fmt: str = "markdown") -> str:
    """Runs' :func:`describe` rows as a Markdown table, CSV (accuracies in %, one row per run)
    or JSON (a list of the rows, each with its accuracy curve; NaN as null).

    Raises:
        ValueError: ``fmt`` is not one of :data:`REPORT_FORMATS`.
    """
    if fmt not in REPORT_FORMATS:
        raise ValueError(f"report format {fmt!r}: expected one of {', '.join(REPORT_FORMATS)}")
    if fmt == "csv":
        return rows_csv(rows)
    if fmt == "json":
        return json.dumps([_json_safe(row) for row in rows], indent=2) + "\n"
    return rows_table(rows)


def rows_csv(rows: Sequence[dict]) -> str:
    """:func:`describe` rows as CSV with a header line (:data:`_CSV_COLUMNS`; NaN and None empty)."""
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(_CSV_COLUMNS)
    for row in rows:
        writer.writerow(["" if _json_safe(row[c]) is None else row[c] for c in _CSV_COLUMNS])
    return buffer.getvalue()


def _json_safe(value: object) -> object:
    """``value`` with every NaN (a round not evaluated, a run without one) replaced by None."""
    if isinstance(value, float) and math.isnan(value):
        return None
    if isinstance(value, dict):
        return {key: _json_safe(item) for key, item in value.items()}
    if isinstance(value, list):
        return [_json_safe(item) for item in value]
    return value


def rows_table(rows: Sequence[dict]) -> str:
    """:func:`table` from rows already read with :func:`describe`."""
    lines = [
        "| run | dataset | alpha | averaging | precision | rounds | test accuracy (%) | scored with "
        "| fp32 act. (%) | policy act. (%) | uplink MB/round |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in rows:
        named = " | ".join("-" if r.get(f"mean_{name}") is None else f"{r[f'mean_{name}']:.1f}" for name in ACTIVATIONS)
        accuracy = "-" if math.isnan(r["mean"]) else f"{r['mean']:.1f} +- {r['std']:.1f}"  # -: no round evaluated
        lines.append(
            f"| {r['run']} | {r['dataset']} | {r['alpha']} | {r['averaging']} | {r['precision']} | {r['rounds']} "
            f"| {accuracy} | {r['scored_with'].replace('_act', ' act.')} | {named} "
            f"| {r['bytes_up_per_round'] / 1e6:.2f} |"
        )
    return "\n".join(lines) + "\n"


def margin_verdicts(rows: Mapping[str, dict], subject: str, margins: Sequence[tuple[str, float]]) -> list[str]:
    """Whether ``subject``'s final accuracy is at least each other run's plus a margin, one line each.

    Args:
        rows: run name -> its :func:`describe` row (``mean``: accuracy in %).
        subject: the run under test.
        margins: ``(other run, margin in accuracy points)``; a negative margin allows ``subject``
            to be that much below. Pairs with a missing run are left out.

    Returns:
        Markdown lines, e.g. ``"- q8-avg >= q8-noavg + 3.0 points: 80.12 vs 72.20 + 3.0: holds"``
        (two decimals: a verdict near the margin is not hidden by the table's one-decimal rounding).
    """
    if subject not in rows:
        return []
    lines = []
    ours = rows[subject]["mean"]
    for other, margin in margins:
        if other not in rows:
            continue
        theirs = rows[other]["mean"]
        verdict = "holds" if ours >= theirs + margin else "does not hold"
        lines.append(f"{_comparison(subject, other, margin)}: {ours:.2f} vs {theirs:.2f} {_signed(margin)}: {verdict}")
    return lines


def _signed(margin: float) -> str:
    """``"+ 3.0"`` or ``"- 1.0"``: a margin in points as it follows another run's accuracy."""
    return f"{'+' if margin >= 0 else '-'} {abs(margin):.1f}"


def _comparison(subject: str, other: str, margin: float) -> str:
    """The Markdown head of one verdict line, e.g. ``"- q8-avg >= q8-noavg + 3.0 points"``."""
    return f"- {subject} >= {other} {_signed(margin)} points"


def window_verdicts(rows: Mapping[str, dict], subject: str, margins: Sequence[tuple[str, float]], *,
                    first_end: int, window: int = LAST_ROUNDS) -> list[str]:
    """How often :func:`margin_verdicts`' comparisons hold when the final window is moved back.

    A single window of the last ``window`` rounds is one sample of a curve that, without the
    server average, swings by several points from round to round; this counts, for each pair,
    the windows ending at rounds ``first_end`` .. (the shorter run's last round) whose means
    satisfy the margin. Windows holding a round either run did not evaluate (NaN, ``--eval_every``)
    are left out, and the overall means are over the rounds both evaluated.

    Args:
        rows: run name -> its :func:`describe` row (``curve``: accuracy in % by round).
        subject: the run under test.
        margins: ``(other run, margin in accuracy points)``, as for :func:`margin_verdicts`.
        first_end: the round (1-based) the earliest window ends at.
        window: rounds per window.

    Returns:
        Markdown lines, e.g. ``"- q8-avg >= fp32-noavg - 1.0 points: holds in 93 of 94 windows
        ending at rounds 100-193 (mean over rounds 96-193: 76.93 vs 70.85)"``; pairs with a missing
        run, or whose shorter run has not reached ``first_end`` (or has no evaluated window), are left out.
    """
    if first_end < window:
        raise ValueError(f"first_end={first_end} must be at least the window ({window} rounds)")
    if subject not in rows:
        return []
    lines = []
    for other, margin in margins:
        if other not in rows:
            continue
        ours, theirs = rows[subject]["curve"], rows[other]["curve"]
        last_end = min(len(ours), len(theirs))
        if last_end < first_end:
            continue
        ends = [end for end in range(first_end, last_end + 1)
                if not any(math.isnan(a) for a in (*ours[end - window:end], *theirs[end - window:end]))]
        if not ends:
            continue
        held = sum(statistics.fmean(ours[end - window:end]) >= statistics.fmean(theirs[end - window:end]) + margin
                   for end in ends)
        start = first_end - window
        left_out = last_end + 1 - first_end - len(ends)
        both = [i for i in range(start, last_end) if not (math.isnan(ours[i]) or math.isnan(theirs[i]))]
        lines.append(f"{_comparison(subject, other, margin)}: holds in {held} of {len(ends)} "
                     f"windows ending at rounds {first_end}-{last_end}"
                     f"{f' ({left_out} with a round not evaluated left out)' if left_out else ''} "
                     f"(mean over rounds {start + 1}-{last_end}: "
                     f"{statistics.fmean(ours[i] for i in both):.2f} vs {statistics.fmean(theirs[i] for i in both):.2f})")
    return lines


MARKED_ROUNDS = 50  # a curve of at most this many evaluated rounds marks each (one round is a dot, not nothing)


def seed_of(name: str) -> tuple[str, int]:
    """``(config, seed)`` of a run folder named ``<config>`` (seed 0) or ``<config>-s<seed>``."""
    config, sep, seed = name.rpartition("-s")
    if sep and seed.isdigit():
        return config, int(seed)
    return name, 0


def _mean_sd(values: Sequence[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (0 for one value) of ``values``."""
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def seed_rows(rows: Mapping[str, dict]) -> dict[str, dict]:
    """Runs (:func:`describe` rows keyed by folder name) grouped by configuration over their seeds.

    Each group: ``seeds`` (sorted), ``rounds`` (the fewest any seed has), and for ``mean`` (the run's
    ``test_accuracy`` protocol), ``mean_fp32_act`` and ``mean_policy_act``: the mean and the sample sd
    over seeds of each run's last-5-round mean (%), as ``<key>`` and ``<key>_sd`` (None where a seed
    lacks that score), the paper's way of reporting repeated runs.
    """
    groups: dict[str, dict[int, dict]] = {}
    for name, row in rows.items():
        config, seed = seed_of(name)
        groups.setdefault(config, {})[seed] = row
    out = {}
    for config, by_seed in groups.items():
        entry: dict = {"seeds": sorted(by_seed), "rounds": min(r["rounds"] for r in by_seed.values()),
                       "by_seed": by_seed}
        for key in ("mean", "mean_fp32_act", "mean_policy_act"):
            values = [r.get(key) for r in by_seed.values()]
            ok = [v for v in values if v is not None and not math.isnan(v)]
            entry[key], entry[f"{key}_sd"] = _mean_sd(ok) if len(ok) == len(values) and ok else (None, None)
        out[config] = entry
    return out


def paired_differences(groups: Mapping[str, dict], subject: str, margins: Sequence[tuple[str, float]]) -> list[str]:
    """The claim checked on paired seeds: for each ``(other, margin)``, ``subject - other`` per seed both
    ran (seeds share partition and client sampling across configurations), as mean +- sd over those
    seeds, and whether the mean difference is at least ``margin`` points. One Markdown line each."""
    lines = []
    if subject not in groups:
        return lines
    for other, margin in margins:
        if other not in groups:
            continue
        seeds = sorted(set(groups[subject]["by_seed"]) & set(groups[other]["by_seed"]))
        if not seeds:
            continue
        diffs = [groups[subject]["by_seed"][s]["mean"] - groups[other]["by_seed"][s]["mean"] for s in seeds]
        mean, sd = _mean_sd(diffs)
        verdict = "holds" if mean >= margin else "does not hold"
        per_seed = ", ".join(f"s{s} {_no_negative_zero(d, 1):+.1f}" for s, d in zip(seeds, diffs))
        spread = f" +- {sd:.2f} over {len(seeds)} seeds" if len(seeds) > 1 else " on one seed"
        lines.append(f"- {subject} - {other} >= {margin:+.1f} points: {_no_negative_zero(mean, 2):+.2f}{spread} "
                     f"({per_seed}): {verdict}")
    return lines


def _no_negative_zero(value: float, digits: int) -> float:
    """``value`` rounded to ``digits`` decimals, a rounded -0.0 made 0.0 (a tie of two runs reads +0.00)."""
    return round(value, digits) + 0.0


def plot_curves(run_dirs: Sequence[Path], path: Path) -> Path:
    """Test accuracy and test loss by evaluated round (``test_accuracy``, ``test_loss``), every run on
    the same two panels; round ticks are integers, and a short curve marks its rounds. Saved in the format
    ``path``'s suffix names, else as PNG with ``.png`` added; returns the path written.

    Raises:
        ValueError: ``path`` is a folder.
    """
    path = Path(path)
    if path.is_dir():
        raise ValueError(f"{path} is a folder, expected a file name for the curves such as {path / CURVES}")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from matplotlib.ticker import MaxNLocator

    fig, (acc_ax, loss_ax) = plt.subplots(1, 2, figsize=(11, 4))
    last_round = 1
    for run_dir in run_dirs:
        rounds = [r for r in read_metrics(Path(run_dir)) if r.get("test_accuracy") is not None]
        if not rounds:
            continue
        x = [r["round"] for r in rounds]
        last_round = max(last_round, x[-1])
        style = {"label": run_label(run_dir), "marker": "o" if len(x) <= MARKED_ROUNDS else None, "markersize": 4}
        acc_ax.plot(x, [100 * r["test_accuracy"] for r in rounds], **style)
        loss_ax.plot(x, [r.get("test_loss") for r in rounds], **style)
    acc_ax.set(xlabel="round", ylabel="test accuracy (%)", title="Test accuracy")
    loss_ax.set(xlabel="round", ylabel="test loss (nats)", title="Test loss")
    for ax in (acc_ax, loss_ax):
        ax.grid(alpha=0.3)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True, min_n_ticks=1))  # rounds are whole numbers
        left, right = ax.get_xlim()  # at least half a round either side: one round spans no fraction
        ax.set_xlim(min(left, 0.5), max(right, last_round + 0.5))
    if acc_ax.lines:  # none while no round is evaluated yet
        acc_ax.legend(fontsize=8)
    fig.tight_layout()
    if path.suffix[1:].lower() not in fig.canvas.get_supported_filetypes():
        path = path.with_name(f"{path.name}.png")
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
