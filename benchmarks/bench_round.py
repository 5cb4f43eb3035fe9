"""One round's local training of the paper's FMNIST setting: the sequential path against the fast path.

Run: ``python benchmarks/bench_round.py --data_path ../shared/data [--clients K] [--device cpu|cuda] [--json]``

The paper's setting (REFERENCE §4: ConvNet width 128, alpha 0.01, 80 clients, batch 32, Adam 1e-3,
one epoch; 8-bit W/A/G/E with BC blocks) on the first ``K`` clients sampled in round 1, trained from
the initial model and encoded for the uplink, as :meth:`lptfl.sim.engine.Simulation.train` does in a
round. Two simulations of each precision: the sequential path (``--workers 1 --cohort off``: one
process trains one client after another with torch's default threads, as ``lptfl run`` did before
workers and cohorts) and the fast path (``lptfl run``'s defaults on this machine: ``--workers auto``
processes on a CPU, the batched cohort on CUDA; ``--workers`` / ``--cohort`` override them). The
four are interleaved in each repetition so that background load falls on all alike; times are
medians over the repetitions after the first. ``startup_s`` is the fast path's extra start-up: its
workers' start plus its first 8-bit round's extra time (compilation, allocation).
``max_rel_diff_fp32_update`` is the largest relative L2 difference between a client's fp32 update
(the decoded uplink) from the two paths over all parameters; ``max_rel_diff_fp32_update_live``
leaves out the parameters the model's output does not depend on (a convolution's bias right before
instance norm, whose gradient is zero up to float noise that Adam's normalisation turns into full
steps). The last line is JSON.
"""

from __future__ import annotations

import argparse
import json
import logging
import platform
import resource
import statistics
import time

import torch

from lptfl import codec
from lptfl.experiment.config import RunConfig
from lptfl.experiment.setup import sample_clients
from lptfl.sim.client_side import ClientJob, RoundJob
from lptfl.sim.engine import Simulation

PAPER = dict(dataset="fmnist", model_name="ConvNet", num_clients=80, frac=0.4, alpha=0.01, epochs=1,
             batch_size=32, lr=1e-3, block_dim="BC", c_rounds=200)
Q8 = dict(use_quantization=True, quantization_bits=8)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def prenorm_biases(model: torch.nn.Module) -> set[str]:
    """Names of convolution biases that feed a per-channel normalisation directly (output-independent)."""
    names, modules = set(), list(model.named_modules())
    for (name, module), (_, following) in zip(modules, modules[1:]):
        is_instance_norm = isinstance(following, torch.nn.GroupNorm) and following.num_groups == following.num_channels
        if isinstance(module, torch.nn.Conv2d) and module.bias is not None and is_instance_norm:
            names.add(f"{name}.bias")
    return names


def relative_difference(a: dict, b: dict, start: dict, names: list[str]) -> float:
    num = sum(float(((a[k] - b[k]).double() ** 2).sum()) for k in names) ** 0.5
    den = sum(float(((b[k].cpu() - start[k]).double() ** 2).sum()) for k in names) ** 0.5
    return num / den


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data_path", default="../shared/data")
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--workers", type=int, default=0, help="the fast path's --workers (0: auto)")
    parser.add_argument("--cohort", default="auto", choices=("auto", "on", "off"), help="the fast path's --cohort")
    parser.add_argument("--repeats", type=int, default=3, help="repetitions (the first is the warm-up)")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO if not args.json else logging.WARNING, format="%(name)s: %(message)s")
    device = torch.device(args.device)
    default_threads = torch.get_num_threads()
    sims, threads, built = {}, {}, {}
    for precision, extra in (("q8", Q8), ("fp32", {})):
        for path, flags in (("sequential", dict(workers=1, cohort="off")),
                            ("fast", dict(workers=args.workers, cohort=args.cohort))):
            torch.set_num_threads(default_threads)
            mark = time.perf_counter()
            sims[path, precision] = Simulation(RunConfig(**PAPER, **extra, **flags, data_path=args.data_path,
                                                         device=args.device))
            built[path, precision] = time.perf_counter() - mark
            threads[path, precision] = torch.get_num_threads()  # a worker group sets its own
    some = sims["sequential", "fp32"]
    clients = sample_clients(some.config.num_clients, some.config.frac, some.config.seed, 1)[: args.clients]
    times: dict[tuple[str, str], list[float]] = {}
    replies: dict[tuple[str, str], list] = {}
    try:
        for _ in range(args.repeats):
            for key, sim in sims.items():
                torch.set_num_threads(threads[key])
                job = RoundJob(1, sim.config.lr, sim.server.downlink(), clients=[ClientJob(c) for c in clients])
                sync(device)
                mark = time.perf_counter()
                replies[key] = sim.train(job)
                sync(device)
                times.setdefault(key, []).append(time.perf_counter() - mark)
    finally:
        workers = {key: sim.workers.size if sim.workers is not None else 1 for key, sim in sims.items()}
        for sim in sims.values():
            sim.close()
    median = {k: statistics.median(v[1:] if len(v) > 1 else v) for k, v in times.items()}
    start = some.initial
    params = [name for name, _ in some.model.named_parameters()]
    live = [name for name in params if name not in prenorm_biases(some.model)]
    decoded = {key: [codec.decode(r.payload) for r in replies[key]] for key in (("fast", "fp32"), ("sequential", "fp32"))}
    pairs = list(zip(decoded["fast", "fp32"], decoded["sequential", "fp32"]))
    fast, sequential = sims["fast", "q8"], sims["sequential", "q8"]
    result = {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
        "threads_sequential": threads["sequential", "q8"],
        "workers_fast_q8": workers["fast", "q8"],
        "threads_fast_q8": threads["fast", "q8"],
        "workers_fast_fp32": workers["fast", "fp32"],
        "threads_fast_fp32": threads["fast", "fp32"],
        "cohort_fast": fast.clients.cohort is not None,
        "clients": len(clients),
        "steps": sum(sequential.clients.steps(c) for c in clients),
        "round_s_sequential_q8": round(median["sequential", "q8"], 3),
        "round_s_fast_q8": round(median["fast", "q8"], 3),
        "ratio_fast_over_sequential_q8": round(median["fast", "q8"] / median["sequential", "q8"], 3),
        "round_s_sequential_fp32": round(median["sequential", "fp32"], 3),
        "round_s_fast_fp32": round(median["fast", "fp32"], 3),
        "ratio_fast_over_sequential_fp32": round(median["fast", "fp32"] / median["sequential", "fp32"], 3),
        "max_rel_diff_fp32_update": max(relative_difference(a, b, start, params) for a, b in pairs),
        "max_rel_diff_fp32_update_live": max(relative_difference(a, b, start, live) for a, b in pairs),
        "max_rel_diff_q8_loss": max(abs(a.loss - b.loss) / b.loss
                                    for a, b in zip(replies["fast", "q8"], replies["sequential", "q8"])),
        "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
        "startup_s": round(built["fast", "q8"] - built["sequential", "q8"]
                           + times["fast", "q8"][0] - median["fast", "q8"], 3),
    }
    if not args.json:
        for key, value in result.items():
            print(f"{key:36s} {value}")
    print(json.dumps(result))


if __name__ == "__main__":
    main()
