"""One round's local training of the paper's FMNIST setting: clients one after another against a batched cohort.

Run: ``python benchmarks/bench_round.py --data_path ../shared/data [--clients K] [--device cpu|cuda] [--json]``

The paper's setting (REFERENCE §4: ConvNet width 128, alpha 0.01, 80 clients, batch 32, Adam 1e-3,
one epoch; 8-bit W/A/G/E with BC blocks) on the first ``K`` clients sampled in round 1. Each
repetition trains those clients from the same start four ways, interleaved so that background load
falls on all alike: the sequential path as ``lptfl run`` trains one client after another (its
default threads and compile setting: compiled at 8 bits, eager in fp32) and the batched cohort
(:mod:`lptfl.fl.cohort`, compiled where the sequential path is), each in fp32 and in 8 bits. Times are medians over the repetitions after
the first; ``startup_s`` is the first repetition's extra time on the fast path's 8-bit round
(compilation, allocation). ``max_rel_diff_fp32_update`` is the largest relative L2 difference
between a client's fp32 update from the two paths over all parameters;
``max_rel_diff_fp32_update_live`` leaves out the parameters the model's output does not depend on
(a convolution's bias right before instance norm, whose gradient is zero up to float noise that
Adam's normalisation turns into full steps). The last line is JSON.
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import statistics
import time

import torch

from lptfl.data import load_dataset
from lptfl.experiment.config import RunConfig
from lptfl.experiment.setup import build_run_model, sample_clients, split_clients
from lptfl.fl.client import LocalTrainer, TrainResult
from lptfl.fl.cohort import CohortClient, CohortTrainer
from lptfl.fl.seeds import derive_seed

PAPER = dict(dataset="fmnist", model_name="ConvNet", num_clients=80, frac=0.4, alpha=0.01, epochs=1,
             batch_size=32, lr=1e-3, block_dim="BC")


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


class Setting:
    """The model, start state and trainers of one precision."""

    def __init__(self, config: RunConfig, data, device: torch.device) -> None:
        policy = config.policy()
        model = build_run_model(config, data)
        self.start = {k: v.clone() for k, v in model.state_dict().items()}
        example = data.train_x[: config.batch_size]
        self.sequential = LocalTrainer(model, policy, optimizer=config.optimizer, lr=config.lr, example_input=example,
                                       compile=not policy.is_full_precision, device=device)
        self.cohort = CohortTrainer(self.sequential, compile=self.sequential.compiled)
        self.skip = prenorm_biases(model)


def run_sequential(setting: Setting, clients, xs, ys, config: RunConfig) -> list[TrainResult]:
    out = []
    for c in clients:
        setting.sequential.inner.state.clear()
        generator = torch.Generator().manual_seed(derive_seed(config.seed, 1, c))
        out.append(setting.sequential.train(setting.start, xs[c], ys[c], epochs=config.epochs,
                                            batch_size=config.batch_size, generator=generator))
    return out


def run_cohort(setting: Setting, clients, xs, ys, config: RunConfig) -> list[TrainResult]:
    members = [CohortClient(setting.start, xs[c], ys[c], torch.Generator().manual_seed(derive_seed(config.seed, 1, c)))
               for c in clients]
    return [r.result for r in setting.cohort.train(members, epochs=config.epochs, batch_size=config.batch_size,
                                                   lr=config.lr)]


def relative_difference(a: TrainResult, b: TrainResult, start: dict, skip: set[str] = frozenset()) -> float:
    names = [k for k in start if k not in skip]
    num = sum(float(((a.state[k] - b.state[k]).double() ** 2).sum()) for k in names) ** 0.5
    den = sum(float(((b.state[k].cpu() - start[k]).double() ** 2).sum()) for k in names) ** 0.5
    return num / den


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data_path", default="../shared/data")
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--repeats", type=int, default=3, help="repetitions (the first is the warm-up)")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    device = torch.device(args.device)
    base = RunConfig(**PAPER, data_path=args.data_path, device=args.device)
    data = load_dataset("fmnist", args.data_path)
    parts, _ = split_clients(base, data.train_y.numpy())
    clients = sample_clients(base.num_clients, base.frac, base.seed, 1)[: args.clients]
    xs = {c: data.train_x[torch.from_numpy(parts[c])] for c in clients}
    ys = {c: data.train_y[torch.from_numpy(parts[c])] for c in clients}
    settings = {"fp32": Setting(base, data, device),
                "q8": Setting(RunConfig(**PAPER, data_path=args.data_path, device=args.device, use_quantization=True,
                                        quantization_bits=8), data, device)}
    times: dict[str, list[float]] = {}
    last: dict[str, list[TrainResult]] = {}
    for _ in range(args.repeats):
        for precision in ("q8", "fp32"):
            for path, run in (("sequential", run_sequential), ("fast", run_cohort)):
                sync(device)
                mark = time.perf_counter()
                last[f"{path}_{precision}"] = run(settings[precision], clients, xs, ys, base)
                sync(device)
                times.setdefault(f"{path}_{precision}", []).append(time.perf_counter() - mark)
    median = {k: statistics.median(v[1:] if len(v) > 1 else v) for k, v in times.items()}
    fp32 = settings["fp32"]
    pairs = list(zip(last["fast_fp32"], last["sequential_fp32"]))
    result = {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
        "threads": torch.get_num_threads(),
        "clients": len(clients),
        "steps": sum(r.steps for r in last["sequential_q8"]),
        "round_s_sequential_q8": round(median["sequential_q8"], 3),
        "round_s_fast_q8": round(median["fast_q8"], 3),
        "ratio_fast_over_sequential_q8": round(median["fast_q8"] / median["sequential_q8"], 3),
        "round_s_sequential_fp32": round(median["sequential_fp32"], 3),
        "round_s_fast_fp32": round(median["fast_fp32"], 3),
        "ratio_fast_over_sequential_fp32": round(median["fast_fp32"] / median["sequential_fp32"], 3),
        "max_rel_diff_fp32_update": max(relative_difference(a, b, fp32.start) for a, b in pairs),
        "max_rel_diff_fp32_update_live": max(relative_difference(a, b, fp32.start, fp32.skip) for a, b in pairs),
        "max_rel_diff_q8_loss": max(abs(a.loss - b.loss) / b.loss for a, b in zip(last["fast_q8"], last["sequential_q8"])),
        "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
        "startup_s": round(times["fast_q8"][0] - median["fast_q8"], 3),
    }
    if not args.json:
        for key, value in result.items():
            print(f"{key:36s} {value}")
    print(json.dumps(result))


if __name__ == "__main__":
    main()
