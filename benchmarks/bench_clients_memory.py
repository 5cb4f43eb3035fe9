"""Peak memory of the simulator for 100 / 1,000 / 10,000 clients (ConvNet, FMNIST).

Run: ``python benchmarks/bench_clients_memory.py [--data_path ../shared/data] [--rounds 2] [--json]``

Each federation size runs in its own process (so peaks do not mix) for a few rounds of the
paper's 8-bit setting with 10 clients sampled per round (``--sampled``); its peak RSS is read from
``getrusage``. Client optimizer state is kept only for clients that trained, in memory
or (``client_state=auto`` above 2 GiB of potential state) spilled to disk under the run
directory. Without ``--data_path`` files, the embedded digits dataset is used instead
(1,437 training samples, so the largest size is capped at that).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

CHILD = r"""
import json, resource, sys, time
from lptfl.experiment.config import RunConfig
from lptfl.sim.engine import Simulation
cfg = RunConfig(**json.loads(sys.argv[1]))
sim = Simulation(cfg, out_dir=sys.argv[2])
start = time.perf_counter()
for _ in range(cfg.c_rounds):
    m = sim.run_round()
state = sim.store
print(json.dumps({
    "clients": cfg.num_clients,
    "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    "seconds": time.perf_counter() - start,
    "client_state": "none" if state is None else ("disk" if state.directory else "memory"),
    "client_state_in_memory_mb": 0 if state is None else state.nbytes / 1e6,
    "test_accuracy": m.test_accuracy,
}))
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data_path", default="../shared/data")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--sizes", default="100,1000,10000")
    parser.add_argument("--sampled", type=int, default=10, help="clients sampled per round")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    try:
        sizes = [int(s) for s in args.sizes.split(",")]
    except ValueError:
        sizes = []
    if not sizes or min(sizes) < 1 or args.sampled < 1 or args.rounds < 1:
        parser.error(f"--sizes {args.sizes!r}, --sampled {args.sampled}, --rounds {args.rounds}: expected "
                     "comma-separated client counts >= 1 and integers >= 1")
    has_fmnist = (Path(args.data_path) / "FashionMNIST" / "raw").exists()
    print(f"dataset: {'fmnist' if has_fmnist else 'digits (no FashionMNIST/raw under --data_path)'}", flush=True)
    results = []
    for size in sizes:
        clients = size if has_fmnist else min(size, 1437)
        config = {
            "dataset": "fmnist" if has_fmnist else "digits",
            "data_path": args.data_path,
            "num_clients": clients,
            "frac": min(1.0, args.sampled / clients),
            "c_rounds": args.rounds,
            "alpha": 0.01,
            "use_quantization": True,
            "quantization_bits": 8,
            "moving_average": True,
            "compile": "auto",
            "test_batch_size": 2000,
        }
        with tempfile.TemporaryDirectory() as out:
            proc = subprocess.run([sys.executable, "-c", CHILD, json.dumps(config), out], capture_output=True, text=True)
        if proc.returncode:
            raise SystemExit(f"the run of {clients} clients failed (exit {proc.returncode}): "
                             f"{(proc.stderr.strip().splitlines() or ['no output'])[-1]}")
        row = json.loads(proc.stdout.strip().splitlines()[-1])
        results.append(row)
        print(
            f"{row['clients']:>6} clients: peak RSS {row['peak_rss_mb']:8.1f} MB, client state {row['client_state']}"
            f" ({row['client_state_in_memory_mb']:.1f} MB in memory), {row['seconds']:.0f} s for {args.rounds} rounds",
            flush=True,
        )
    if args.json:
        print(json.dumps({"dataset": "fmnist" if has_fmnist else "digits", "runs": results}))


if __name__ == "__main__":
    main()
