"""A round of the paper's FMNIST setting: lptfl against the published code, measured side by side.

Run: ``python benchmarks/bench_vs_published.py --published DIR --data_path DATA [--clients K] [--json]``
on an otherwise idle machine (about 9 minutes on 2 cores).

``DIR`` is a checkout of the authors' code (https://github.com/digbangbang/LPT-FL); nothing of
it is part of this repository. ``DATA`` holds Fashion-MNIST in torchvision's layout.

Four configurations, in the paper's setting (80 clients, 40% sampled, alpha 0.01, ConvNet, one
local epoch at batch 32, Adam 1e-3, 8-bit BC blocks, moving average 0.9):

- ``published_fp32`` / ``published_q8``: the published client loop (its ``ConvNet`` with its
  ``BlockQuantizer`` after every layer, its gradient and weight quantizers over each parameter
  after every step, one Adam per client) and its server evaluation (batch 256, no activation
  quantizer: the moving-average model is evaluated in fp32).
- ``lptfl_fp32`` / ``lptfl_q8``: ``lptfl.sim.Simulation.run_round`` with the same settings (client
  state store, encode/decode, aggregation, moving average and evaluation included).

Each configuration trains ``K`` sampled clients per round (the same clients' data for both
codes), after an untimed warm-up round (compilation); the four alternate round by round, so
background load falls on each alike. A full round is estimated as ``32 x`` the mean client time
plus the evaluation. The published figures are a lower bound for that code: its DataLoader (four
worker processes decoding PIL images), W&B logging and aggregation are left out.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import platform
import statistics
import sys
import time
import types
from pathlib import Path

import torch
import torch.nn as nn

from lptfl.experiment.allocator import keep_freed_memory
from lptfl.cli import build_parser, config_from_args
from lptfl.sim.engine import Simulation

PAPER_FLAGS = [
    "--dataset", "fmnist", "--alpha", "0.01", "--model_name", "ConvNet", "--num_clients", "80",
    "--batch_size", "32", "--moving_average", "--ma_start", "1", "--moving_weight", "0.9",
]
Q8_FLAGS = ["--block_dim", "BC", "--use_quantization", "--quantization_bits", "8"]
SAMPLED_PER_ROUND = 32  # 40% of 80


def load_published(directory: Path) -> tuple[types.ModuleType, types.ModuleType]:
    """The published ``quantizer`` and ``models`` modules, imported from ``directory``.

    Their ``models.py`` imports torchvision's ResNet at module level (used only by the ResNet
    constructors); torchvision cannot be installed beside this torch, so a stand-in module
    takes its place.
    """
    for name in ("quantizer.py", "models.py", "client.py"):
        if not (directory / name).is_file():
            raise SystemExit(f"--published {directory}: no {name}; expected a checkout of digbangbang/LPT-FL")
    resnet = types.ModuleType("torchvision.models.resnet")
    resnet.ResNet = resnet.BasicBlock = object
    for name, module in (("torchvision", types.ModuleType("torchvision")),
                         ("torchvision.models", types.ModuleType("torchvision.models")),
                         ("torchvision.models.resnet", resnet)):
        sys.modules.setdefault(name, module)
    loaded = []
    for name in ("quantizer", "models"):
        spec = importlib.util.spec_from_file_location(f"published_{name}", directory / f"{name}.py")
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        loaded.append(module)
    return loaded[0], loaded[1]


class PublishedRound:
    """The published client loop and server evaluation for ``bits`` (-1: fp32)."""

    def __init__(self, quantizer: types.ModuleType, models: types.ModuleType, bits: int, sim: Simulation,
                 test_batch_size: int = 256) -> None:
        activation = lambda: quantizer.BlockQuantizer(bits, bits, "stochastic", "FC", "BC")  # noqa: E731
        self.quantize = lambda x: quantizer.quantize_block(x, bits, -1, "stochastic", "FC", "BC")  # noqa: E731
        torch.manual_seed(0)
        self.model = models.ConvNet(10, dataset="fmnist", im_size=(28, 28), quant=activation)
        server_activation = lambda: quantizer.BlockQuantizer(-1, -1, "stochastic", "FC", "BC")  # noqa: E731
        self.server_model = models.ConvNet(10, dataset="fmnist", im_size=(28, 28), quant=server_activation)
        self.optimizers: dict[int, torch.optim.Optimizer] = {}
        self.sim = sim
        self.test_batch_size = test_batch_size

    def client(self, index: int) -> float:
        """Seconds of one client update (one epoch, batch 32), as the published ``Client`` runs it."""
        x, y = self.sim.clients.client_x[index], self.sim.clients.client_y[index]
        model = self.model
        model.load_state_dict(self.server_model.state_dict())  # synchronize_with_server
        optimizer = self.optimizers.setdefault(index, torch.optim.Adam(model.parameters(), lr=1e-3))
        start = time.perf_counter()
        model.train()
        order = torch.randperm(len(y))
        for i in range(0, len(y), 32):
            batch = order[i : i + 32]
            logits = model(x[batch])
            loss = nn.CrossEntropyLoss()(logits, y[batch])
            loss.item()
            optimizer.zero_grad()
            loss.backward()
            with torch.no_grad():
                for _, param in model.named_parameters():
                    param.grad.data = self.quantize(param.grad.data).data
            optimizer.step()
            with torch.no_grad():
                for _, param in model.named_parameters():
                    param.data = self.quantize(param.data).data
        return time.perf_counter() - start

    def round(self, round_index: int, clients: int) -> tuple[list[float], float]:
        """(seconds of each of ``clients`` client updates, evaluation seconds) of one round."""
        chosen = [(round_index * 7 + k * 11) % 80 for k in range(clients)]
        return [self.client(c) for c in chosen], self.evaluate()

    def evaluate(self) -> float:
        """Seconds of the published ``eval_op_ensemble`` over the test set."""
        x, y = self.sim.data.test_x, self.sim.data.test_y
        start = time.perf_counter()
        self.server_model.eval()
        correct, loss_sum = 0, 0.0
        with torch.no_grad():
            for i in range(0, len(y), self.test_batch_size):
                logits = self.server_model(x[i : i + self.test_batch_size])
                loss_sum += nn.CrossEntropyLoss()(logits, y[i : i + self.test_batch_size]).item()
                correct += (logits.argmax(1) == y[i : i + self.test_batch_size]).sum().item()
        return time.perf_counter() - start


class LptflRound:
    """``Simulation.run_round`` sampling ``clients`` of 80 (``frac = clients / 80``)."""

    def __init__(self, data_path: str, quantized: bool, clients: int) -> None:
        flags = ["run", *PAPER_FLAGS, "--data_path", data_path, "--frac", str(clients / 80), "--quiet"]
        self.config = config_from_args(build_parser().parse_args(flags + (Q8_FLAGS if quantized else [])))
        self.sim = Simulation(self.config)

    def round(self, round_index: int, clients: int) -> tuple[list[float], float]:
        """(seconds per client update including encode/decode, evaluation seconds) of the next round
        (``round_index`` and ``clients`` are the simulation's own: its sampling and ``--frac``)."""
        metrics = self.sim.run_round()
        per_client = (metrics.phase_s["train"] + metrics.phase_s["codec"]) / metrics.accepted
        return [per_client] * metrics.accepted, metrics.phase_s["eval"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--published", type=Path, required=True, help="checkout of digbangbang/LPT-FL")
    parser.add_argument("--data_path", required=True, help="folder with FashionMNIST/raw/")
    parser.add_argument("--clients", type=int, default=3, help="client updates timed per configuration and round")
    parser.add_argument("--rounds", type=int, default=2, help="timed rounds (after one warm-up round)")
    parser.add_argument("--json", action="store_true", help="print one JSON object as the last line")
    args = parser.parse_args()
    if not 1 <= args.clients <= SAMPLED_PER_ROUND:
        parser.error(f"--clients must be in 1..{SAMPLED_PER_ROUND}, got {args.clients}")
    keep_freed_memory()  # as the CLI does
    quantizer, models = load_published(args.published)

    ours = {"lptfl_fp32": LptflRound(args.data_path, False, args.clients),
            "lptfl_q8": LptflRound(args.data_path, True, args.clients)}
    sim = ours["lptfl_q8"].sim
    theirs = {"published_fp32": PublishedRound(quantizer, models, -1, sim),
              "published_q8": PublishedRound(quantizer, models, 8, sim)}

    rounds: dict[str, LptflRound | PublishedRound] = {**ours, **theirs}
    client_s: dict[str, list[float]] = {name: [] for name in rounds}
    eval_s: dict[str, list[float]] = {name: [] for name in rounds}
    for round_index in range(args.rounds + 1):
        for name, runner in rounds.items():
            clients, evaluation = runner.round(round_index, args.clients)
            if round_index > 0:  # round 0 warms up (torch.compile, allocator)
                client_s[name] += clients
                eval_s[name].append(evaluation)
            print(f"round {round_index} {name:15s} client {statistics.mean(clients):6.2f} s  eval {evaluation:6.2f} s",
                  flush=True)

    result: dict = {"machine": platform.processor() or platform.machine(), "torch": torch.__version__,
                    "threads": torch.get_num_threads(), "clients_timed": args.clients, "rounds_timed": args.rounds}
    print(f"estimated round ({SAMPLED_PER_ROUND} clients + evaluation), medians of {args.rounds} rounds:")
    for name in rounds:
        client, evaluation = statistics.median(client_s[name]), statistics.median(eval_s[name])
        result[f"{name}_client_s"], result[f"{name}_eval_s"] = client, evaluation
        result[f"{name}_round_s"] = SAMPLED_PER_ROUND * client + evaluation
        print(f"  {name:15s} {result[f'{name}_round_s']:7.1f} s  (client {client:.2f} s, eval {evaluation:.1f} s)")
    for a, b in (("lptfl_q8", "published_q8"), ("lptfl_fp32", "published_fp32"), ("lptfl_q8", "lptfl_fp32"),
                 ("published_q8", "published_fp32")):
        result[f"ratio_{a}_over_{b}"] = result[f"{a}_round_s"] / result[f"{b}_round_s"]
        print(f"ratio {a} / {b}: {result[f'ratio_{a}_over_{b}']:.3f}")
    if args.json:
        print(json.dumps(result))


if __name__ == "__main__":
    main()
