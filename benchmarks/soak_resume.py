"""Soak test of crash-safe checkpoints (not run in CI).

Runs one experiment uninterrupted, and the same experiment again while SIGKILLing it at random
moments (during start-up, training, metrics or checkpoint writing) and resuming it with
``lptfl run --resume DIR`` until it finishes. The two must end with identical metrics (all
fields but timings) and a bit-identical final model, optimizer states included.

    python benchmarks/soak_resume.py --rounds 40 --kills 8 --dropout 0.2
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from lptfl.experiment.results import compare_rounds, read_metrics
from lptfl.experiment.checkpoint import CONFIG, load_checkpoint


def run_args(args: argparse.Namespace) -> list[str]:
    return [
        "--dataset", "digits", "--c_rounds", str(args.rounds), "--num_clients", str(args.num_clients),
        "--frac", str(args.frac), "--dropout", str(args.dropout), "--min_clients", str(args.min_clients),
        "--model_width", str(args.model_width), "--compile", args.compile, "--seed", str(args.seed),
        "--checkpoint_every", str(args.checkpoint_every), "--quiet", *args.extra,
    ]


def lptfl(*argv: str, log: Path) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    with open(log, "a") as handle:  # a file, not a pipe: a long run cannot block on a full pipe
        return subprocess.Popen([sys.executable, "-m", "lptfl", "run", *argv], env=env,
                                stdout=subprocess.DEVNULL, stderr=handle)


def count_lines(run_dir: Path) -> int:
    try:
        return (run_dir / "metrics.jsonl").read_bytes().count(b"\n")
    except FileNotFoundError:
        return 0


def same_final_state(a: Path, b: Path) -> bool:
    left, right = load_checkpoint(a), load_checkpoint(b)
    if left is None or right is None or left.round != right.round:
        return False
    if any(not torch.equal(v, right.global_state[k]) for k, v in left.global_state.items()):
        return False
    if (left.average_state is None) != (right.average_state is None):
        return False
    if left.average_state and any(not torch.equal(v, right.average_state[k]) for k, v in left.average_state.items()):
        return False
    if sorted(left.client_memory) != sorted(right.client_memory):
        return False
    return all((f == right.client_memory[c][0]).all() and (s == right.client_memory[c][1]).all()
               for c, (f, s) in left.client_memory.items())


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=30)
    parser.add_argument("--kills", type=int, default=6, help="SIGKILLs to deliver before letting the run finish")
    parser.add_argument("--num_clients", type=int, default=10)
    parser.add_argument("--frac", type=float, default=0.5)
    parser.add_argument("--dropout", type=float, default=0.2)
    parser.add_argument("--min_clients", type=int, default=2)
    parser.add_argument("--model_width", type=int, default=16)
    parser.add_argument("--compile", default="off")
    parser.add_argument("--checkpoint_every", type=int, default=1)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--max_delay", type=float, default=4.0,
                        help="longest wait (s) before a kill, counted from the first new metrics line (or from "
                             "the launch, for one kill in five: those hit start-up)")
    parser.add_argument("--out", type=Path, help="keep the runs here (default: a temporary directory)")
    parser.add_argument("extra", nargs="*", help="more lptfl run flags, after --")
    args = parser.parse_args()
    base = args.out or Path(tempfile.mkdtemp(prefix="lptfl-soak-"))
    reference, victim = base / "reference", base / "victim"
    for path in (reference, victim):
        shutil.rmtree(path, ignore_errors=True)
    rng = random.Random(args.seed)
    base.mkdir(parents=True, exist_ok=True)
    ref_log, victim_log = base / "reference.log", base / "victim.log"

    started = time.monotonic()
    ref = lptfl(*run_args(args), "--out", str(reference), log=ref_log)
    kills, launches = 0, 0
    proc = lptfl(*run_args(args), "--out", str(victim), log=victim_log)
    while True:
        launches += 1
        if kills < args.kills:
            before = count_lines(victim)
            if rng.random() < 0.8:  # let it make progress first, then kill somewhere inside a round
                while proc.poll() is None and count_lines(victim) <= before:
                    time.sleep(0.02)
            try:
                proc.wait(timeout=rng.uniform(0.0, args.max_delay))
            except subprocess.TimeoutExpired:
                proc.send_signal(signal.SIGKILL)
                proc.wait()
                kills += 1
                done = load_checkpoint(victim) if (victim / CONFIG).exists() else None
                print(f"kill {kills}: after round {done.round if done else 0} checkpointed", flush=True)
        else:
            proc.wait()
        if proc.returncode == 0:
            break
        if proc.returncode != -signal.SIGKILL:
            print(f"run failed with {proc.returncode}: {victim_log.read_text()[-2000:]}", file=sys.stderr)
            return 1
        if (victim / CONFIG).exists():
            proc = lptfl("--resume", str(victim), "--quiet", log=victim_log)
        else:  # killed before the run had even saved its config: start it again
            proc = lptfl(*run_args(args), "--out", str(victim), "--overwrite", log=victim_log)
    if ref.wait() != 0:
        print(f"reference run failed: {ref_log.read_text()[-2000:]}", file=sys.stderr)
        return 1
    rounds, victim_rounds = read_metrics(reference), read_metrics(victim)
    same_metrics = len(victim_rounds) == len(rounds) == compare_rounds(rounds, victim_rounds).identical
    same_state = same_final_state(victim, reference)
    print(json.dumps({
        "rounds": len(rounds), "kills": kills, "launches": launches,
        "failed_clients": sum(r["failed"] for r in rounds), "skipped_rounds": sum(r["skipped"] for r in rounds),
        "identical_metrics": same_metrics, "identical_final_state": same_state,
        "final_accuracy": rounds[-1]["test_accuracy"], "seconds": round(time.monotonic() - started, 1),
        "runs": str(base),
    }, indent=2))
    return 0 if same_metrics and same_state else 1


if __name__ == "__main__":
    sys.exit(main())
