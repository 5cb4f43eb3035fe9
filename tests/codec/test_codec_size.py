"""Payload sizes for the paper's ConvNet (FMNIST shapes) relative to the fp32 payload."""

from __future__ import annotations

import pytest
import torch

from lptfl.codec import decode, encode
from lptfl.quant.format import BFPFormat
from lptfl.quant.quantize import quantize

# ConvNet(width 128, depth 3, GroupNorm(128)), 1x28x28 inputs, 10 classes: 317,706 values.
CONVNET_SHAPES = {
    "features.0.weight": (128, 1, 3, 3),
    "features.0.bias": (128,),
    "features.1.weight": (128,),
    "features.1.bias": (128,),
    "features.4.weight": (128, 128, 3, 3),
    "features.4.bias": (128,),
    "features.5.weight": (128,),
    "features.5.bias": (128,),
    "features.8.weight": (128, 128, 3, 3),
    "features.8.bias": (128,),
    "features.9.weight": (128,),
    "features.9.bias": (128,),
    "classifier.weight": (10, 2048),
    "classifier.bias": (10,),
}
LIMITS = {(8, "B"): 0.252, (4, "B"): 0.128, (8, "BC"): 0.28}


def _state(init: str, seed: int) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    state = {}
    for name, shape in CONVNET_SHAPES.items():
        fan_in = 1
        for d in shape[1:]:
            fan_in *= d
        if init == "uniform":  # PyTorch's default init: U(-1/sqrt(fan_in), 1/sqrt(fan_in))
            bound = 1.0 / max(fan_in, 1) ** 0.5
            state[name] = (torch.rand(shape, generator=gen) * 2 - 1) * bound
        else:
            state[name] = torch.randn(shape, generator=gen)
    return state


@pytest.mark.parametrize("init", ["uniform", "normal"])
@pytest.mark.parametrize(("bits", "layout"), list(LIMITS))
def test_convnet_payload_ratio(init, bits, layout):
    raw = _state(init, seed=bits)
    baseline = len(encode(raw, None))
    assert baseline > 4 * 317_706
    fmt = BFPFormat(bits, layout=layout)
    gen = torch.Generator().manual_seed(0)
    state = {name: quantize(t, fmt, generator=gen) for name, t in raw.items()}
    payload = encode(state, fmt)
    ratio = len(payload) / baseline
    assert ratio <= LIMITS[(bits, layout)], f"{bits}-bit {layout}: {ratio:.5f}"
    assert len(encode(state, fmt, compress=True)) <= len(payload) + 64
    out = decode(payload)
    assert all(torch.equal(out[n], state[n]) for n in state)
