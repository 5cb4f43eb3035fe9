"""Quantizer throughput and the ConvNet training step: fp32 vs 8-bit LPT, measured side by side.

Run: ``python benchmarks/bench_quant.py [--json] [--steps N] [--device cpu|cuda]``

Prints quantize throughput (GB/s, bytes read + written) on weight-, gradient- and
activation-sized tensors, then the ConvNet step (REFERENCE §3, FMNIST shape, batch 32,
Adam) in eager fp32, compiled fp32 and 8-bit LPT (W/A/G/E 8 bits, BC layout for weights
and gradients, stochastic rounding). Step times are medians of interleaved repetitions,
so background load affects every configuration alike. Memory: bytes saved for backward
per step (autograd's saved tensors) and the process's peak RSS growth during training.
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import statistics
import time

import torch
import torch.nn.functional as F

from lptfl.experiment.allocator import keep_freed_memory
from lptfl.models import ConvNet
from lptfl.quant import BFPFormat, PrecisionPolicy, reseed_quantizers
from lptfl.quant.compiled import MaybeCompiled
from lptfl.quant.compute import fast_bf16_available
from lptfl.quant.quantize import quantize_with_key
from lptfl.quant.random import draw_key


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def quantize_throughput(shape, fmt: BFPFormat, device: torch.device, *, compiled: bool, repeat: int = 20) -> float:
    """GB/s of ``quantize`` on a random tensor of ``shape`` (4 bytes read + 4 written per element)."""
    x = torch.randn(shape, device=device)
    key = draw_key(torch.Generator(device=device).manual_seed(0) if device.type == "cuda" else torch.Generator().manual_seed(0), device)
    fn = MaybeCompiled(quantize_with_key, enabled=compiled)
    for _ in range(3):
        fn(x, fmt, key)
    sync(device)
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn(x, fmt, key)
        sync(device)
        times.append(time.perf_counter() - start)
    return 8 * x.numel() / statistics.median(times) / 1e9


class StepRunner:
    """One configuration of the ConvNet training step."""

    def __init__(self, name: str, policy: PrecisionPolicy, *, compiled: bool, device: torch.device) -> None:
        torch.manual_seed(0)
        self.name = name
        self.device = device
        self.model = ConvNet(1, 10, 28).to(device)
        self.x = torch.randn(32, 1, 28, 28, device=device)
        self.y = torch.randint(0, 10, (32,), device=device)
        policy.prepare_model(self.model, self.x)
        self.generator = torch.Generator().manual_seed(0)
        self.optimizer = policy.wrap_optimizer(
            torch.optim.Adam(self.model.parameters(), 1e-3), self.generator, compile=compiled
        )
        self.forward_backward = MaybeCompiled(self._forward_backward, enabled=compiled)

    def _forward_backward(self, x, y):
        loss = F.cross_entropy(self.model(x), y)
        loss.backward()
        return loss.detach()

    def step(self) -> None:
        reseed_quantizers(self.model, self.generator)
        self.optimizer.zero_grad(set_to_none=False)
        self.forward_backward(self.x, self.y)
        self.optimizer.step()

    def saved_bytes(self) -> int:
        """Bytes autograd keeps for backward in one (eager) forward pass."""
        total = 0

        def pack(t):
            nonlocal total
            total += t.numel() * t.element_size()
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            loss = F.cross_entropy(self.model(self.x), self.y)
        loss.backward()
        self.optimizer.zero_grad()
        return total


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", action="store_true", help="print one JSON object as the last line")
    parser.add_argument("--steps", type=int, default=15, help="timed steps per configuration")
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    keep_freed_memory()  # as the CLI does
    device = torch.device(args.device)
    result: dict = {
        "device": str(device),
        "machine": platform.processor() or platform.machine(),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "fast_bf16": fast_bf16_available(device),
    }

    weight = BFPFormat(8, layout="BC")
    act = BFPFormat(8, layout="tensor")
    cases = {
        "weight": ((128, 128, 3, 3), weight),
        "gradient": ((128, 128, 3, 3), weight),
        "activation": ((32, 128, 32, 32), act),
    }
    print("quantize throughput (GB/s, stochastic rounding):")
    for name, (shape, fmt) in cases.items():
        eager = quantize_throughput(shape, fmt, device, compiled=False)
        fused = quantize_throughput(shape, fmt, device, compiled=True)
        result[f"quantize_gbps_{name}"] = fused
        result[f"quantize_gbps_{name}_eager"] = eager
        print(f"  {name:10s} {str(shape):20s} compiled {fused:6.2f}   eager {eager:6.2f}")

    lpt = PrecisionPolicy.low_precision(8)
    configs = [
        StepRunner("fp32", PrecisionPolicy.full_precision(), compiled=False, device=device),
        StepRunner("fp32_compiled", PrecisionPolicy.full_precision(), compiled=True, device=device),
        StepRunner("lpt8", lpt, compiled=True, device=device),
    ]
    rss_before = peak_rss_mb()
    for runner in configs:
        for _ in range(3):  # compile and warm up
            runner.step()
    sync(device)
    times: dict[str, list[float]] = {r.name: [] for r in configs}
    for _ in range(args.steps):
        for runner in configs:
            start = time.perf_counter()
            runner.step()
            sync(device)
            times[runner.name].append(time.perf_counter() - start)
    print("ConvNet training step (batch 32, FMNIST shape, Adam), median ms:")
    for runner in configs:
        ms = 1000 * statistics.median(times[runner.name])
        result[f"step_ms_{runner.name}"] = ms
        result[f"saved_for_backward_mb_{runner.name}"] = runner.saved_bytes() / 1e6
        print(f"  {runner.name:14s} {ms:8.1f} ms   saved for backward {result[f'saved_for_backward_mb_{runner.name}']:.1f} MB")
    result["step_ratio_lpt8_over_fp32"] = result["step_ms_lpt8"] / result["step_ms_fp32"]
    result["step_ratio_lpt8_over_fp32_compiled"] = result["step_ms_lpt8"] / result["step_ms_fp32_compiled"]
    result["peak_rss_growth_mb_all_configs"] = peak_rss_mb() - rss_before
    print(f"ratio lpt8 / fp32 eager:    {result['step_ratio_lpt8_over_fp32']:.3f}")
    print(f"ratio lpt8 / fp32 compiled: {result['step_ratio_lpt8_over_fp32_compiled']:.3f}")
    if args.json:
        print(json.dumps(result))


if __name__ == "__main__":
    main()
