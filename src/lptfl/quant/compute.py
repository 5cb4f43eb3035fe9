"""Exact bf16 compute for layers whose operands are on a <= 8-bit grid.

Every value of a <= 8-bit block-floating-point grid is exact in bfloat16, so a conv or
linear product whose input, weight and incoming error are all quantized can run in bf16
with fp32 accumulation without changing its operands. Only the accumulation order and
the bf16 rounding of the product's output (at most half a bf16 ulp) differ from fp32.
Layers are switched by changing their class to a subclass with the same parameters and
state-dict keys; layers whose input is not a quantizer's output stay fp32.
"""

from __future__ import annotations

import functools
import logging
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from torch._C._functorch import is_batchedtensor

from lptfl.quant.activation import Quantizer

log = logging.getLogger(__name__)
_BF16 = torch.bfloat16


@functools.lru_cache(maxsize=None)
def _cpu_has_fast_bf16() -> bool:
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return any(flag in flags.split() for flag in ("avx512_bf16", "amx_bf16"))


def fast_bf16_available(device: torch.device | str) -> bool:
    """True where bf16 products are faster than fp32: CUDA with bf16 support, or a CPU
    with AVX512-BF16 / AMX-BF16 instructions."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    if device.type == "cpu":
        return _cpu_has_fast_bf16()
    return False


class _BF16Conv2dFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, stride, padding, dilation, groups):
        xb, wb = x.to(_BF16), weight.to(_BF16)
        ctx.save_for_backward(xb, wb)
        ctx.conf = (stride, padding, dilation, groups, x.dtype, bias is not None)
        y = F.conv2d(xb, wb, None, stride, padding, dilation, groups).to(x.dtype)
        return y if bias is None else y + bias.view(1, -1, 1, 1)

    @staticmethod
    def backward(ctx, grad):
        xb, wb = ctx.saved_tensors
        stride, padding, dilation, groups, dtype, has_bias = ctx.conf
        gb = grad.to(_BF16)
        gx = gw = None
        if ctx.needs_input_grad[0]:
            gx = torch.nn.grad.conv2d_input(xb.shape, wb, gb, stride, padding, dilation, groups).to(dtype)
        if ctx.needs_input_grad[1]:
            gw = torch.nn.grad.conv2d_weight(xb, wb.shape, gb, stride, padding, dilation, groups).to(dtype)
        gbias = grad.sum(dim=(0, 2, 3)) if has_bias and ctx.needs_input_grad[2] else None
        return gx, gw, gbias, None, None, None, None


class _BF16LinearFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias):
        xb, wb = x.to(_BF16), weight.to(_BF16)
        ctx.save_for_backward(xb, wb)
        ctx.conf = (x.dtype, bias is not None)
        y = F.linear(xb, wb).to(x.dtype)
        return y if bias is None else y + bias

    @staticmethod
    def backward(ctx, grad):
        xb, wb = ctx.saved_tensors
        dtype, has_bias = ctx.conf
        gb = grad.to(_BF16)
        gx = (gb @ wb).to(dtype) if ctx.needs_input_grad[0] else None
        gw = None
        if ctx.needs_input_grad[1]:
            gw = (gb.reshape(-1, gb.shape[-1]).t() @ xb.reshape(-1, xb.shape[-1])).to(dtype)
        gbias = grad.reshape(-1, grad.shape[-1]).sum(0) if has_bias and ctx.needs_input_grad[2] else None
        return gx, gw, gbias


def _batched(*tensors: torch.Tensor) -> bool:
    """Whether any of ``tensors`` is one client's view of a cohort under ``torch.func.vmap``."""
    return any(is_batchedtensor(t) for t in tensors)


class BF16Conv2d(nn.Conv2d):
    """A Conv2d whose product runs in bf16 with fp32 accumulation (operands must be on a <= 8-bit grid)."""

    def _conv_forward(self, input, weight, bias):
        if self.padding_mode != "zeros":
            return super()._conv_forward(input, weight, bias)
        if _batched(input, weight):  # under vmap autograd's own casts give the same products and errors
            y = F.conv2d(input.to(_BF16), weight.to(_BF16), None, self.stride, self.padding, self.dilation,
                         self.groups).to(input.dtype)
            return y if bias is None else y + bias.view(-1, 1, 1)
        return _BF16Conv2dFn.apply(input, weight, bias, self.stride, self.padding, self.dilation, self.groups)


class BF16Linear(nn.Linear):
    """A Linear layer whose product runs in bf16 with fp32 accumulation (operands on a <= 8-bit grid)."""

    def forward(self, input):
        if _batched(input, self.weight):
            y = F.linear(input.to(_BF16), self.weight.to(_BF16)).to(input.dtype)
            return y if self.bias is None else y + self.bias
        return _BF16LinearFn.apply(input, self.weight, self.bias)


_SWAPS = {nn.Conv2d: BF16Conv2d, nn.Linear: BF16Linear}
_RESHAPES = (nn.Flatten, nn.Unflatten, nn.Identity)  # keep values on the grid


def quantizer_fed(model: nn.Module, example_input: torch.Tensor, kinds: tuple[type[nn.Module], ...]) -> list[str]:
    """Names of the modules of exactly the types ``kinds`` whose input is a quantizer's output
    (also through flatten/reshape layers), found by one forward pass on ``example_input`` (no
    gradients)."""
    produced: dict[int, torch.Tensor] = {}
    fed: list[str] = []
    names = {module: name for name, module in model.named_modules()}

    def record(module, inputs, output):
        produced[id(output)] = output

    def propagate(module, inputs, output):
        if inputs and id(inputs[0]) in produced:
            produced[id(output)] = output

    def check(module, inputs):
        if inputs and id(inputs[0]) in produced:
            fed.append(names[module])

    handles = [m.register_forward_hook(record) for m in model.modules() if isinstance(m, Quantizer)]
    handles += [m.register_forward_hook(propagate) for m in model.modules() if isinstance(m, _RESHAPES)]
    handles += [m.register_forward_pre_hook(check) for m in model.modules() if type(m) in kinds]
    try:
        with torch.no_grad():
            model(example_input)
    finally:
        for handle in handles:
            handle.remove()
    return fed


def enable_bf16_compute(model: nn.Module, example_input: torch.Tensor) -> list[str]:
    """Switch to bf16 every Conv2d/Linear of ``model`` whose input is a quantizer's output
    (:func:`quantizer_fed`). Weights must be kept on a <= 8-bit grid by the optimizer.

    Returns:
        Names of the switched layers.
    """
    fed = quantizer_fed(model, example_input, tuple(_SWAPS))
    modules = dict(model.named_modules())
    for name in fed:
        modules[name].__class__ = _SWAPS[type(modules[name])]
    log.info("bf16 compute for %d layers: %s", len(fed), ", ".join(fed))
    return fed
