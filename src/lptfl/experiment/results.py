"""Result files of a run: ``metrics.jsonl`` (one object per round) and ``summary.json``."""

from __future__ import annotations

import functools
import json
import math
import os
import platform
import statistics
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from lptfl.experiment.config import RunConfig
from lptfl.quant.compute import fast_bf16_available

METRICS = "metrics.jsonl"
SUMMARY = "summary.json"
CURVES = "curves.png"
LAST_ROUNDS = 5
# Fields of a round that measure the machine rather than the computation: a rerun may differ in them.
TIMING_FIELDS = ("round_time_s", "wall_time_s", "phase_s")


@dataclass
class RoundMetrics:
    """One line of ``metrics.jsonl``. Accuracy is a fraction in [0, 1]; bytes are payload lengths."""

    round: int
    train_loss: float
    test_accuracy: float
    test_loss: float
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


def append_metrics(out_dir: Path, metrics: RoundMetrics) -> None:
    """Append one round's line to ``metrics.jsonl`` and flush it to disk."""
    with open(out_dir / METRICS, "a", encoding="utf-8") as handle:
        handle.write(json.dumps(asdict(metrics)) + "\n")
        handle.flush()
        os.fsync(handle.fileno())


def read_metrics(run_dir: Path) -> list[dict]:
    """The rounds recorded in ``run_dir/metrics.jsonl`` (empty if none).

    Raises ``ValueError`` naming the file and line when a line is not JSON (e.g. the last one of a
    run killed while appending it, until ``lptfl run --resume`` cuts the file back to its checkpoint).
    """
    path = Path(run_dir) / METRICS
    if not path.exists():
        return []
    rounds = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            rounds.append(json.loads(line))
        except json.JSONDecodeError as err:
            raise ValueError(f"{path} line {number} is not JSON ({err.msg}); if a run was killed while writing "
                             f"it, `lptfl run --resume {run_dir}` cuts the file back to its checkpoint") from err
    return rounds


@dataclass(frozen=True)
class RoundsComparison:
    """Two runs' ``metrics.jsonl`` compared round by round in every field but :data:`TIMING_FIELDS`.

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


def compare_rounds(reference: list[dict], candidate: list[dict]) -> RoundsComparison:
    """Compare two runs' rounds (as :func:`read_metrics` returns them), matched by ``round`` number."""
    by_round = {r["round"]: r for r in reference}
    compared = identical = 0
    first = None
    for row in candidate:
        other = by_round.get(row["round"])
        if other is None:
            continue
        compared += 1
        fields = tuple(sorted(k for k in row.keys() | other.keys()
                              if k not in TIMING_FIELDS and not _same(row.get(k), other.get(k))))
        if not fields:
            identical += 1
        elif first is None or row["round"] < first[0]:
            first = (row["round"], fields)
    return RoundsComparison(len(reference), len(candidate), compared, identical, first)


def summarize(config: RunConfig, rounds: list[dict], *, wall_time_s: float) -> dict:
    """The summary: config, mean +- std of the last 5 rounds' test accuracy, byte totals, wall time."""
    last = [r["test_accuracy"] for r in rounds[-LAST_ROUNDS:]]
    return {
        "config": config.to_dict(),
        "config_fingerprint": config.fingerprint(),
        "rounds": len(rounds),
        "final_accuracy_mean": statistics.fmean(last) if last else None,
        "final_accuracy_std": statistics.pstdev(last) if len(last) > 1 else 0.0,
        "final_test_loss": rounds[-1]["test_loss"] if rounds else None,
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


def write_summary(out_dir: Path, summary: dict) -> None:
    """Write ``summary.json`` atomically."""
    tmp = out_dir / (SUMMARY + ".tmp")
    tmp.write_text(json.dumps(summary, indent=2) + "\n", encoding="utf-8")
    os.replace(tmp, out_dir / SUMMARY)
