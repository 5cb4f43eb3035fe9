"""Wire-format benchmark: payload size relative to fp32 and encode/decode throughput.

Builds the state dicts straight from the shapes (no model code): the paper's ConvNet on
FMNIST shapes and a CIFAR ResNet-18 (batch-norm running statistics sent in full
precision). Weights get PyTorch's default uniform init, are quantized with the format
(seeded stochastic rounding) and then encoded, as a client's upload would be.

Sizes are ``len(payload) / len(encode(state, None))`` (the full-precision payload with
the same container). Throughput is MB of fp32-equivalent data (4 bytes per value) per
second, best of ``--repeat`` runs.

    python benchmarks/bench_wire.py [--models convnet resnet18] [--repeat 3] [--threads N] [--json]
"""

from __future__ import annotations

import argparse
import json
import math
import time

import torch

from lptfl.codec import decode, encode
from lptfl.quant.format import BFPFormat
from lptfl.quant.quantize import quantize

BITS = (8, 6, 5, 4)
LAYOUTS = ("B", "BC")


def convnet_shapes() -> dict[str, tuple[int, ...]]:
    """ConvNet(width 128, depth 3, GroupNorm) for 1x28x28 inputs and 10 classes."""
    shapes: dict[str, tuple[int, ...]] = {}
    in_ch = 1
    for i in range(3):
        shapes[f"conv{i}.weight"] = (128, in_ch, 3, 3)
        shapes[f"conv{i}.bias"] = (128,)
        shapes[f"norm{i}.weight"] = (128,)
        shapes[f"norm{i}.bias"] = (128,)
        in_ch = 128
    shapes["fc.weight"] = (10, 128 * 4 * 4)
    shapes["fc.bias"] = (10,)
    return shapes


def _bn(shapes: dict, prefix: str, ch: int) -> None:
    for suffix in ("weight", "bias", "running_mean", "running_var"):
        shapes[f"{prefix}.{suffix}"] = (ch,)
    shapes[f"{prefix}.num_batches_tracked"] = ()


def resnet18_shapes() -> dict[str, tuple[int, ...]]:
    """CIFAR ResNet-18: 3x3 stem, 4 stages of 2 BasicBlocks, 1x1 downsample convs, fc."""
    shapes: dict[str, tuple[int, ...]] = {"conv1.weight": (64, 3, 3, 3)}
    _bn(shapes, "bn1", 64)
    in_ch = 64
    for stage, ch in enumerate((64, 128, 256, 512), start=1):
        for block in range(2):
            p = f"layer{stage}.{block}"
            shapes[f"{p}.conv1.weight"] = (ch, in_ch, 3, 3)
            _bn(shapes, f"{p}.bn1", ch)
            shapes[f"{p}.conv2.weight"] = (ch, ch, 3, 3)
            _bn(shapes, f"{p}.bn2", ch)
            if block == 0 and in_ch != ch:
                shapes[f"{p}.downsample.0.weight"] = (ch, in_ch, 1, 1)
                _bn(shapes, f"{p}.downsample.1", ch)
            in_ch = ch
    shapes["fc.weight"] = (10, 512)
    shapes["fc.bias"] = (10,)
    return shapes


def build_state(shapes: dict[str, tuple[int, ...]], seed: int = 0) -> tuple[dict[str, torch.Tensor], list[str]]:
    """Random state with PyTorch-like init; returns it and the names to keep full precision."""
    gen = torch.Generator().manual_seed(seed)
    state: dict[str, torch.Tensor] = {}
    full_precision = []
    for name, shape in shapes.items():
        if name.endswith("num_batches_tracked"):
            state[name] = torch.tensor(100, dtype=torch.int64)
        elif name.endswith("running_mean"):
            state[name] = torch.randn(shape, generator=gen) * 0.1
            full_precision.append(name)
        elif name.endswith("running_var"):
            state[name] = torch.rand(shape, generator=gen) + 0.5
            full_precision.append(name)
        else:
            fan_in = math.prod(shape[1:]) if len(shape) > 1 else shape[0]
            bound = 1.0 / math.sqrt(fan_in)
            state[name] = (torch.rand(shape, generator=gen) * 2 - 1) * bound
    return state, full_precision


def _best(fn, repeat: int) -> tuple[float, object]:
    best, out = math.inf, None
    for _ in range(repeat):
        start = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - start)
    return best, out


def bench_model(name: str, shapes: dict, repeat: int) -> dict:
    state, full_precision = build_state(shapes)
    fp32_mb = sum(t.numel() * 4 for t in state.values()) / 1e6
    floats = sum(t.numel() for t in state.values() if t.is_floating_point())
    base = len(encode(state, None, full_precision=full_precision))
    base_z = len(encode(state, None, full_precision=full_precision, compress=True))
    result = {
        "params": floats,
        "fp32_payload_bytes": base,
        "fp32_zstd_ratio": base_z / base,
        "configs": [],
    }
    print(f"\n{name}: {floats:,} float values, fp32 payload {base:,} bytes (zstd: {base_z / base:.4f})")
    print(f"{'bits':>4} {'layout':>6} {'bytes':>10} {'ratio':>8} {'zstd':>8} {'enc MB/s':>9} {'dec MB/s':>9} {'enc+q MB/s':>10}")
    gen = torch.Generator().manual_seed(1)
    for bits in BITS:
        for layout in LAYOUTS:
            fmt = BFPFormat(bits, layout=layout)
            q = {
                n: quantize(t, fmt, generator=gen) if t.is_floating_point() and n not in full_precision else t
                for n, t in state.items()
            }
            t_enc, payload = _best(lambda: encode(q, fmt, full_precision=full_precision), repeat)
            t_dec, _ = _best(lambda: decode(payload), repeat)
            # Off-grid input: encode rounds (nearest) on the way.
            t_encq, _ = _best(lambda: encode(state, fmt, full_precision=full_precision), repeat)
            zbytes = len(encode(q, fmt, full_precision=full_precision, compress=True))
            row = {
                "bits": bits,
                "layout": layout,
                "bytes": len(payload),
                "ratio": len(payload) / base,
                "zstd_bytes": zbytes,
                "zstd_ratio": zbytes / base,
                "encode_MBps": fp32_mb / t_enc,
                "decode_MBps": fp32_mb / t_dec,
                "encode_offgrid_MBps": fp32_mb / t_encq,
            }
            result["configs"].append(row)
            print(
                f"{bits:>4} {layout:>6} {len(payload):>10,} {row['ratio']:>8.4f} {row['zstd_ratio']:>8.4f} "
                f"{row['encode_MBps']:>9.0f} {row['decode_MBps']:>9.0f} {row['encode_offgrid_MBps']:>10.0f}"
            )
    return result


MODELS = {"convnet": convnet_shapes, "resnet18": resnet18_shapes}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", choices=sorted(MODELS), default=["convnet", "resnet18"])
    parser.add_argument("--repeat", type=int, default=3, help="timing repeats (best is reported)")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--json", action="store_true", help="print one JSON object as the last line")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    results = {
        "torch_threads": torch.get_num_threads(),
        "models": {m: bench_model(m, MODELS[m](), args.repeat) for m in args.models},
    }
    if args.json:
        print(json.dumps(results, separators=(",", ":")))


if __name__ == "__main__":
    main()
