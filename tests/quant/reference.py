"""A slow, obviously correct block-floating-point quantizer (plain Python loops, nearest rounding)."""

from __future__ import annotations

import itertools
import math

import torch

from lptfl.quant.format import BFPFormat


def _blocks(shape: tuple[int, ...], fmt: BFPFormat) -> dict[tuple[int, ...], list[tuple[int, ...]]]:
    layout = fmt.block_layout(len(shape))
    lead = {"tensor": 0, "B": 1, "BC": 2}[layout]
    groups: dict[tuple[int, ...], list[tuple[int, ...]]] = {}
    for index in itertools.product(*(range(s) for s in shape)):
        groups.setdefault(index[:lead], []).append(index)
    return groups


def reference_quantize_nearest(x: torch.Tensor, fmt: BFPFormat) -> torch.Tensor:
    """REFERENCE.md §2 with nearest rounding, one element at a time, in exact float64 arithmetic."""
    values = x.to(torch.float64)
    out = torch.zeros_like(values)
    for members in _blocks(tuple(x.shape), fmt).values():
        m = max(abs(values[i].item()) for i in members)
        if m == 0:
            continue
        _, exp = math.frexp(m)  # m = f * 2**exp with f in [0.5, 1)
        e = min(max(exp - 1, fmt.exp_min), fmt.exp_max)
        scale = math.ldexp(1.0, e - (fmt.bits - 2))
        for i in members:
            q = round(values[i].item() / scale)  # Python rounds half to even
            q = min(max(q, fmt.mantissa_min), fmt.mantissa_max)
            out[i] = q * scale
    return out.to(x.dtype)
