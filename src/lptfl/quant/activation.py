"""The activation/error quantizer: rounds values in the forward pass and errors in backward.

Each :class:`Quantizer` owns a rounding key (a non-persistent int32 buffer, so it never
appears in a state dict or on the wire). :func:`lptfl.quant.insert.reseed_quantizers`
refreshes the keys of every quantizer in a model from one generator before each step, so
stochastic rounding is reproducible and the forward pass needs no host call.
"""

from __future__ import annotations

import torch
from torch import nn
from torch._C._functorch import is_batchedtensor

from lptfl.quant.cohort_quantizer import quantize_client_activation
from lptfl.quant.format import BFPFormat
from lptfl.quant.quantize import check_quantizable, quantize_with_key
from lptfl.quant.random import mix_key

_BACKWARD_SALT = 1


class _QuantizeForwardBackward(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, key: torch.Tensor, fwd: BFPFormat | None, bwd: BFPFormat | None):
        ctx.bwd = bwd
        ctx.save_for_backward(key)
        if fwd is None:
            out = x.view_as(x)
        else:
            out = quantize_with_key(x, fwd, key if fwd.rounding == "stochastic" else None)
        # Compiled, the output must be a fresh tensor: returning the tensor its rounding steps changed
        # in place, this Function passed zero gradients back on CUDA (docs/measurements.md). The copy
        # is fused away there; eager calls skip it.
        return out.clone() if torch.compiler.is_compiling() else out

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        bwd = ctx.bwd
        if bwd is None:
            return grad, None, None, None
        (key,) = ctx.saved_tensors
        grad_key = mix_key(key, _BACKWARD_SALT) if bwd.rounding == "stochastic" else None
        return quantize_with_key(grad, bwd, grad_key), None, None, None


def quantize_activation(
    x: torch.Tensor, key: torch.Tensor, forward: BFPFormat | None, backward: BFPFormat | None
) -> torch.Tensor:
    """Quantize ``x`` with ``forward`` and its gradient with ``backward`` (either may be None).

    Args:
        x: any float tensor.
        key: 0-d int32 rounding key on ``x``'s device (the backward key is derived from it).
    """
    return _QuantizeForwardBackward.apply(x, key, forward, backward)


class Quantizer(nn.Module):
    """Quantizes activations (forward) and back-propagated errors (backward).

    Args:
        forward: format of activations, or None to pass them through.
        backward: format of errors, or None to pass them through.
    """

    def __init__(self, forward: BFPFormat | None, backward: BFPFormat | None) -> None:
        super().__init__()
        for fmt in (forward, backward):
            if fmt is not None and not isinstance(fmt, BFPFormat):
                raise TypeError(f"formats must be BFPFormat or None, got {type(fmt).__name__}")
        self.forward_format = forward
        self.backward_format = backward
        self.register_buffer("key", torch.zeros((), dtype=torch.int32), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.forward_format is None and self.backward_format is None:
            return x
        if self.forward_format is not None and not torch.compiler.is_compiling():
            check_quantizable(x, self.forward_format)
        if is_batchedtensor(x):  # one client of a cohort trained as a batched model
            return quantize_client_activation(x, self.key, self.forward_format, self.backward_format)
        return quantize_activation(x, self.key, self.forward_format, self.backward_format)

    def extra_repr(self) -> str:
        fwd = self.forward_format.name if self.forward_format else "none"
        bwd = self.backward_format.name if self.backward_format else "none"
        return f"forward={fwd}, backward={bwd}"
