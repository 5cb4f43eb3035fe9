"""Layers that save for backward in the values' own format: the same results, less saved."""

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lptfl.models import ConvNet
from lptfl.quant import PrecisionPolicy, quantizers_of
from lptfl.quant.compact import GridGroupNorm, MaskReLU, ShapeAvgPool2d, enable_compact_saving


def saved_bytes(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> tuple[int, torch.Tensor, list]:
    total = 0

    def pack(t):
        nonlocal total
        total += t.numel() * t.element_size()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = F.cross_entropy(model(x), y)
    loss.backward()
    return total, loss.detach(), [p.grad.clone() for p in model.parameters()]


@pytest.mark.parametrize("compute", ["fp32", "bf16"])
def test_compact_layers_change_no_result_and_save_under_a_third(compute):
    torch.manual_seed(0)
    x, y = torch.randn(8, 1, 28, 28), torch.randint(0, 10, (8,))
    policy = PrecisionPolicy.low_precision(8, compute=compute)
    plain = ConvNet(1, 10, 28, width=16)
    compact = copy.deepcopy(plain)
    policy.prepare_model(compact, x)  # quantizers + compact layers (+ bf16)
    policy_without = PrecisionPolicy.low_precision(8, compute=compute)
    policy_without.prepare_model(plain)  # quantizers only: no example input, no swaps
    if compute == "bf16":
        from lptfl.quant.compute import enable_bf16_compute
        enable_bf16_compute(plain, x)
    kinds = {type(m) for m in compact.modules()}
    assert {GridGroupNorm, MaskReLU, ShapeAvgPool2d} <= kinds
    assert not {GridGroupNorm, MaskReLU, ShapeAvgPool2d} & {type(m) for m in plain.modules()}
    for a, b in zip(quantizers_of(plain), quantizers_of(compact)):
        a.key.fill_(7), b.key.fill_(7)
    reference_bytes, reference_loss, reference_grads = saved_bytes(plain, x, y)
    ours_bytes, ours_loss, ours_grads = saved_bytes(compact, x, y)
    assert torch.equal(ours_loss, reference_loss)
    for ours, theirs in zip(ours_grads, reference_grads):
        assert torch.equal(ours, theirs)
    assert ours_bytes < 0.45 * reference_bytes


def test_only_quantizer_fed_group_norms_save_bf16():
    # a GroupNorm on unquantized input keeps its full-precision save: bf16 would not be exact there
    model = nn.Sequential(nn.Conv2d(1, 4, 3), nn.GroupNorm(4, 4), nn.ReLU(), nn.AvgPool2d(2))
    swapped = enable_compact_saving(model, torch.randn(2, 1, 8, 8))
    assert type(model[1]) is nn.GroupNorm and swapped == ["2", "3"]
