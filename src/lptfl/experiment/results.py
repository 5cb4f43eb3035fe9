"""What a run's result files hold: ``metrics.jsonl`` (one object per round) and ``summary.json``
(written by :class:`lptfl.experiment.run_dir.RunDirectory`)."""

from __future__ import annotations

import functools
import json
import math
import os
import platform
import reprlib
import statistics
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import torch

from lptfl.experiment.config import RunConfig
from lptfl.quant.compute import fast_bf16_available

METRICS = "metrics.jsonl"
SUMMARY = "summary.json"
CURVES = "curves.png"
LAST_ROUNDS = 5
REPAIR = "restore the file from a copy, or start the run again with --overwrite"  # what to do about a damaged file
# Fields of a round that measure the machine rather than the computation: a rerun may differ in them.
TIMING_FIELDS = ("round_time_s", "wall_time_s", "phase_s")
# The served model's two scores (lptfl.experiment.evaluation): without activation quantizers, and with
# the run's activation format; a round's test metrics are test_accuracy/test_loss (one of the two, by
# --eval_precision) and both by name. All are None in a round that was not evaluated (--eval_every).
ACTIVATIONS = ("fp32_act", "policy_act")
TEST_FIELDS = ("test_accuracy", "test_loss",
               *(f"test_{kind}_{activations}" for activations in ACTIVATIONS for kind in ("accuracy", "loss")))


@dataclass
class RoundMetrics:
    """One line of ``metrics.jsonl``. Accuracy is a fraction in [0, 1], losses are mean cross-entropies
    in nats; bytes are payload lengths. The test metrics (:data:`TEST_FIELDS`) are None (JSON null)
    in a round that did not score the served model (``--eval_every``)."""

    round: int
    train_loss: float
    test_accuracy: float | None
    test_loss: float | None
    bytes_up: int
    bytes_down: int
    bytes_up_per_client: list[int]
    bytes_down_per_client: int
    clients: list[int]
    accepted: int
    rejected: int
    lr: float
    round_time_s: float
    wall_time_s: float
    rejected_reasons: list[str] = field(default_factory=list)
    failed: int = 0
    failed_clients: list[int] = field(default_factory=list)
    rejected_norm: int = 0
    skipped: bool = False
    vote_accuracy: float | None = None  # fedbn: majority vote of the participants' models
    # seconds of the round by phase (simulator): "train" (local updates with their optimizer state),
    # "codec" (encoding uplinks, decoding and aggregating them), "eval" (testing the served model)
    phase_s: dict[str, float] = field(default_factory=dict)
    # the served model scored with fp32 activations and with the run's activation format
    test_accuracy_fp32_act: float | None = None
    test_loss_fp32_act: float | None = None
    test_accuracy_policy_act: float | None = None
    test_loss_policy_act: float | None = None


def read_metrics(run_dir: Path) -> list[dict]:
    """The rounds recorded in ``run_dir/metrics.jsonl`` (empty if none), each a JSON object with an integer
    ``round`` (>= 1) and ``bytes_up`` (>= 0) and a number or null as each of :data:`TEST_FIELDS` it holds.

    Raises:
        ValueError: naming the file, the line and what was expected; for a last line cut short (a run
            killed while appending it), the command that cuts it off.
    """
    path = Path(run_dir) / METRICS
    if not path.exists():
        return []
    text = path.read_text(encoding="utf-8", errors="replace")
    lines = text.splitlines()
    rounds = []
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as err:
            torn = number == len(lines) and not text.endswith("\n")  # no checkpoint counts it: resuming cuts it off
            advice = f"if a run was killed writing it, `lptfl run --resume {run_dir}` cuts it off" if torn else REPAIR
            raise ValueError(f"{path} line {number} is not JSON ({err.msg}), expected one object per round; {advice}") \
                from None
        problem = _round_problem(record)
        if problem is not None:
            raise ValueError(f"{path} line {number} {problem}; {REPAIR}")
        rounds.append(record)
    return rounds


def _round_problem(record: object) -> str | None:
    """What keeps ``record`` from being a round as :func:`read_metrics` returns them (None: nothing)."""
    if not isinstance(record, dict):
        return f"is {reprlib.repr(record)}, expected a JSON object (one round)"
    for name, least in (("round", 1), ("bytes_up", 0)):
        value = record.get(name)
        if type(value) is not int or value < least:
            what = f"{name} {reprlib.repr(value)}" if name in record else f"no {name}"
            return f"has {what}, expected an integer >= {least}"
    wrong = next((name for name in TEST_FIELDS if record.get(name) is not None
                  and type(record[name]) not in (int, float)), None)
    return None if wrong is None else f"has {wrong} {reprlib.repr(record[wrong])}, expected a number or null"


@dataclass(frozen=True)
class RoundsComparison:
    """Two runs' ``metrics.jsonl`` compared round by round in every field but :data:`TIMING_FIELDS`
    (and the evaluations only one of the two rounds holds).

    ``compared``: rounds both runs hold; ``identical``: how many of them match in every field;
    ``first_difference``: the earliest round that does not, with the fields that differ (None when
    all compared rounds match).
    """

    reference_rounds: int
    candidate_rounds: int
    compared: int
    identical: int
    first_difference: tuple[int, tuple[str, ...]] | None


def _same(a: object, b: object) -> bool:
    """JSON values equal, with NaN equal to NaN (a diverged run repeated exactly is identical)."""
    if isinstance(a, float) and isinstance(b, float) and math.isnan(a) and math.isnan(b):
        return True
    if isinstance(a, list) and isinstance(b, list):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    return a == b


def _differs(name: str, a: dict, b: dict) -> bool:
    """Whether field ``name`` differs between two rounds. Timings never do; the evaluations
    (:data:`TEST_FIELDS`, FedBN's ``vote_accuracy``) only where both rounds hold a value: a round not
    evaluated (``--eval_every``) or written before a score existed measured nothing to compare."""
    if name in TIMING_FIELDS:
        return False
    if name in (*TEST_FIELDS, "vote_accuracy") and (a.get(name) is None or b.get(name) is None):
        return False
    return not _same(a.get(name), b.get(name))


def compare_rounds(reference: list[dict], candidate: list[dict]) -> RoundsComparison:
    """Compare two runs' rounds (as :func:`read_metrics` returns them), matched by ``round`` number,
    in the fields that :func:`_differs` compares."""
    by_round = {r["round"]: r for r in reference}
    compared = identical = 0
    first = None
    for row in candidate:
        other = by_round.get(row["round"])
        if other is None:
            continue
        compared += 1
        fields = tuple(sorted(k for k in row.keys() | other.keys() if _differs(k, row, other)))
        if not fields:
            identical += 1
        elif first is None or row["round"] < first[0]:
            first = (row["round"], fields)
    return RoundsComparison(len(reference), len(candidate), compared, identical, first)


def legacy_scores(config: Mapping) -> tuple[str, ...]:
    """Which of :data:`ACTIVATIONS` the ``test_accuracy`` of a line written before both scores were
    kept is (config as a dict): both for an fp32 run, fp32 activations under ``eval_precision``
    ``full``, else the run's activation format (the default then)."""
    if not config.get("use_quantization"):
        return ACTIVATIONS
    return ("fp32_act",) if config.get("eval_precision") == "full" else ("policy_act",)


def round_accuracy(row: Mapping, config: Mapping, activations: str | None = None) -> float | None:
    """A round's test accuracy (fraction 0-1): ``test_accuracy`` when ``activations`` is None, else
    its score with ``"fp32_act"`` or ``"policy_act"`` activations (from ``test_accuracy`` in a line
    that predates the named scores, by :func:`legacy_scores`). None when not evaluated or unknown."""
    if activations is None:
        return row.get("test_accuracy")
    name = f"test_accuracy_{activations}"
    if name in row:
        return row[name]
    return row.get("test_accuracy") if activations in legacy_scores(config) else None


def final_accuracy(rounds: list[dict], config: Mapping, activations: str | None = None) -> tuple[float | None, float]:
    """Mean and population std (fractions 0-1) of :func:`round_accuracy` over the last
    :data:`LAST_ROUNDS` rounds that hold it (rounds not evaluated are passed over); ``(None, 0.0)``
    when none does."""
    scores = [a for a in (round_accuracy(r, config, activations) for r in rounds) if a is not None][-LAST_ROUNDS:]
    return (statistics.fmean(scores) if scores else None), (statistics.pstdev(scores) if len(scores) > 1 else 0.0)


def summarize(config: RunConfig, rounds: list[dict], *, wall_time_s: float) -> dict:
    """The summary: config, mean +- std of the last 5 evaluated rounds' test accuracy (``test_accuracy``
    and both named scores), byte totals, wall time."""
    values = config.to_dict()
    evaluated = [r for r in rounds if r.get("test_accuracy") is not None]
    mean, std = final_accuracy(rounds, values)
    named = {}
    for activations in ACTIVATIONS:
        named[f"final_accuracy_{activations}_mean"], named[f"final_accuracy_{activations}_std"] = final_accuracy(
            rounds, values, activations)
    return {
        "config": values,
        "config_fingerprint": config.fingerprint(),
        "rounds": len(rounds),
        "evaluated_rounds": len(evaluated),
        "final_accuracy_mean": mean,
        "final_accuracy_std": std,
        "test_accuracy_scored_with": config.scored_activations(),
        **named,
        "final_test_loss": evaluated[-1]["test_loss"] if evaluated else None,
        "bytes_up_total": sum(r["bytes_up"] for r in rounds),
        "bytes_down_total": sum(r["bytes_down"] for r in rounds),
        "bytes_counted_from": "len() of the encoded payloads (lptfl.codec, both directions)",
        "rejected_updates_total": sum(r.get("rejected", 0) for r in rounds),
        "failed_clients_total": sum(r.get("failed", 0) for r in rounds),
        "skipped_rounds": [r["round"] for r in rounds if r.get("skipped")],
        "wall_time_s": wall_time_s,
        "machine": machine(config.device),
    }


@functools.lru_cache(maxsize=None)
def cpu_model(cpuinfo: Path = Path("/proc/cpuinfo")) -> str:
    """The CPU's model name (Linux ``/proc/cpuinfo``), else ``platform.processor()`` ('' if unknown);
    read once per file and process (every checkpoint records it)."""
    try:
        for line in cpuinfo.read_text(encoding="utf-8", errors="replace").splitlines():
            key, _, value = line.partition(":")
            if key.strip() == "model name" and value.strip():
                return value.strip()
    except OSError:
        pass
    return platform.processor()


def machine(device: str) -> dict:
    """Where a run ran: platform, CPU model, CPU count, torch version and threads, whether the device
    does bf16 products fast (``fast_bf16``: a CPU with AVX512-BF16/AMX or a CUDA GPU; under
    ``--compute auto`` the 8-bit products then run in bf16) and, on CUDA, the GPU's name."""
    info = {"platform": platform.platform(), "processor": cpu_model(), "cpus": os.cpu_count(),
            "torch": torch.__version__, "torch_threads": torch.get_num_threads(), "device": device,
            "fast_bf16": fast_bf16_available(device)}
    gpu = _gpu_name(device)
    if gpu is not None:
        info["accelerator"] = gpu
    return info


def _gpu_name(device: torch.device | str) -> str | None:
    """The GPU's name where ``device`` is a usable CUDA device, else None."""
    device = torch.device(device)
    return torch.cuda.get_device_name(device) if device.type == "cuda" and torch.cuda.is_available() else None


def numerics(device: torch.device | str) -> dict[str, str | int]:
    """What decides a run's floating-point results besides its settings and seed: the torch version,
    the device type, the processor (the GPU's name on CUDA) and torch's CPU threads (they split the
    sums of a convolution, so 1 and 2 threads round differently). Equal records give bit-identical
    rounds; a resume under another record trains validly but is no longer bit-identical."""
    return {"torch": torch.__version__, "device": torch.device(device).type,
            "processor": _gpu_name(device) or cpu_model(), "threads": torch.get_num_threads()}


def numerics_changes(recorded: dict, current: dict) -> list[str]:
    """The entries of two :func:`numerics` records that differ, as ``'name old -> new'`` (entries
    one record lacks are not compared: checkpoints older than the record have none)."""
    return [f"{name} {recorded[name]!r} -> {current[name]!r}"
            for name in recorded if name in current and recorded[name] != current[name]]
