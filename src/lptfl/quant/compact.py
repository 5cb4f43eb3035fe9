"""Layers that keep what they save for backward in the format it is on (REFERENCE §5: the
paper counts training memory at the word length of the values).

Swapped in by class, like the bf16 layers (:mod:`lptfl.quant.compute`): the same parameters,
state-dict keys and results, bit for bit, with less saved for backward:

- :class:`GridGroupNorm`: a GroupNorm whose input is a <= 8-bit quantizer's output saves that
  input in bfloat16, which holds every such value exactly (2 bytes a value instead of 4);
- :class:`MaskReLU`: saves which outputs are positive (1 byte a value), all its backward reads;
- :class:`ShapeAvgPool2d`: saves nothing; its backward needs only the input's shape.

Under ``torch.func.vmap`` (a batched cohort) and under ``torch.compile`` they compute as their base
classes: compiled, inductor's partitioner chooses what the fused graph saves, and the custom
functions would cut the fusion (docs/measurements.md).
"""

from __future__ import annotations

import logging

import torch
import torch.nn.functional as F
from torch import nn
from torch._C._functorch import is_batchedtensor

from lptfl.quant.compute import quantizer_fed

log = logging.getLogger(__name__)
_BF16 = torch.bfloat16


class _GridGroupNormFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, groups: int, eps: float):
        n, c = x.shape[0], x.shape[1]
        hw = x[0, 0].numel()
        out, mean, rstd = torch.ops.aten.native_group_norm(x, weight, bias, n, c, hw, groups, eps)
        ctx.save_for_backward(x.to(_BF16), weight, mean, rstd)
        ctx.conf = (n, c, hw, groups, x.dtype)
        return out

    @staticmethod
    def backward(ctx, grad):
        xb, weight, mean, rstd = ctx.saved_tensors
        n, c, hw, groups, dtype = ctx.conf
        mask = [ctx.needs_input_grad[0], weight is not None and ctx.needs_input_grad[1],
                weight is not None and ctx.needs_input_grad[2]]
        gx, gw, gb = torch.ops.aten.native_group_norm_backward(
            grad.contiguous(), xb.to(dtype), mean, rstd, weight, n, c, hw, groups, mask)
        return gx, gw, gb, None, None


class _MaskReLUFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        out = torch.relu(x)
        ctx.save_for_backward(out > 0)
        return out

    @staticmethod
    def backward(ctx, grad):
        (positive,) = ctx.saved_tensors
        return torch.where(positive, grad, 0.0)


class _ShapeAvgPool2dFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, kernel, stride, padding, ceil_mode: bool, count_include_pad: bool, divisor):
        ctx.conf = (x.shape, x.dtype, kernel, stride, padding, ceil_mode, count_include_pad, divisor)
        return F.avg_pool2d(x, kernel, stride, padding, ceil_mode, count_include_pad, divisor)

    @staticmethod
    def backward(ctx, grad):
        shape, dtype, kernel, stride, padding, ceil_mode, count_include_pad, divisor = ctx.conf
        like = grad.new_empty(shape, dtype=dtype)  # only its shape is read
        gx = torch.ops.aten.avg_pool2d_backward(grad.contiguous(), like, kernel, stride, padding, ceil_mode,
                                                 count_include_pad, divisor)
        return gx, None, None, None, None, None, None


class GridGroupNorm(nn.GroupNorm):
    """A GroupNorm fed by a <= 8-bit quantizer: saves its input in bfloat16 (exact)."""

    def forward(self, input):
        if _plain(input) or input.dim() < 2:
            return super().forward(input)
        return _GridGroupNormFn.apply(input, self.weight, self.bias, self.num_groups, self.eps)


class MaskReLU(nn.ReLU):
    """A ReLU that saves a one-byte mask of its positive outputs for backward."""

    def forward(self, input):
        if _plain(input) or self.inplace:
            return super().forward(input)
        return _MaskReLUFn.apply(input)


class ShapeAvgPool2d(nn.AvgPool2d):
    """An AvgPool2d that saves nothing for backward."""

    def forward(self, input):
        if _plain(input):
            return super().forward(input)
        stride = self.stride if self.stride is not None else self.kernel_size
        return _ShapeAvgPool2dFn.apply(input, _pair(self.kernel_size), _pair(stride), _pair(self.padding),
                                       self.ceil_mode, self.count_include_pad, self.divisor_override)


def _plain(input: torch.Tensor) -> bool:
    """Whether to compute as the base class: under vmap or torch.compile (see the module docstring)."""
    return is_batchedtensor(input) or torch.compiler.is_compiling()


def _pair(value) -> tuple[int, int]:
    return tuple(value) if isinstance(value, (tuple, list)) else (value, value)


def enable_compact_saving(model: nn.Module, example_input: torch.Tensor) -> list[str]:
    """Swap every ReLU and AvgPool2d of ``model``, and every GroupNorm whose input is a quantizer's
    output (:func:`quantizer_fed`; the quantizers must be <= 8-bit), for the compact layers above.

    Returns:
        Names of the swapped layers.
    """
    fed = set(quantizer_fed(model, example_input, (nn.GroupNorm,)))
    swapped = []
    for name, module in model.named_modules():
        if type(module) is nn.ReLU:
            module.__class__ = MaskReLU
        elif type(module) is nn.AvgPool2d:
            module.__class__ = ShapeAvgPool2d
        elif type(module) is nn.GroupNorm and name in fed:
            module.__class__ = GridGroupNorm
        else:
            continue
        swapped.append(name)
    log.info("compact saving for backward in %d layers: %s", len(swapped), ", ".join(swapped))
    return swapped
