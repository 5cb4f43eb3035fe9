"""The activation/error quantizer of a cohort trained as one batched model (``torch.func.vmap``).

Under vmap each client's forward sees its own tensor; the quantizer must still round each
client's activations and errors with that client's blocks and keys. It is a ``torch.library``
custom op with an autograd formula (the backward rounds the error, as
:class:`lptfl.quant.activation.Quantizer`) and a vmap rule that moves the clients' dimension to the
front and quantizes with ``quantize_with_key(cohort=True)``. A custom op, not an
``autograd.Function``: under ``torch.compile`` a vmapped ``autograd.Function`` passed zero gradients
back (torch 2.13, CPU), while the op keeps its formulas compiled and eager.
"""

from __future__ import annotations

import torch
from torch import Tensor

from lptfl.quant.format import BFPFormat
from lptfl.quant.quantize import quantize_with_key
from lptfl.quant.random import mix_key

_BACKWARD_SALT = 1  # the same derivation of the error's key as the sequential quantizer's
Spec = tuple[int, int, str, str, str]  # a format for the op schema: bits (0: none), exp bits, layout, small block, rounding
_NONE: Spec = (0, 0, "", "", "")


def _spec(fmt: BFPFormat | None) -> Spec:
    return _NONE if fmt is None else (fmt.bits, fmt.exp_bits, fmt.layout, fmt.small_block, fmt.rounding)


def _quantize(x: Tensor, keys: Tensor, spec: Spec) -> Tensor:
    """``x`` (clients along dim 0) rounded per client with ``keys`` (``K``) in the format ``spec``."""
    bits, exp_bits, layout, small_block, rounding = spec
    if bits == 0:
        return x.clone()
    fmt = BFPFormat(bits, exp_bits=exp_bits, layout=layout, small_block=small_block, rounding=rounding)
    return quantize_with_key(x, fmt, keys if rounding == "stochastic" else None, cohort=True)


@torch.library.custom_op("lptfl::quantize_cohort_activation", mutates_args=())
def _activation(x: Tensor, keys: Tensor, fb: int, fe: int, fl: str, fs: str, fr: str,
                bb: int, be: int, bl: str, bs: str, br: str) -> Tensor:
    """Forward rounding of a cohort's activations (the backward format rides along for autograd)."""
    return _quantize(x, keys, (fb, fe, fl, fs, fr))


@torch.library.custom_op("lptfl::quantize_cohort_error", mutates_args=())
def _error(grad: Tensor, keys: Tensor, bb: int, be: int, bl: str, bs: str, br: str) -> Tensor:
    """Backward rounding of a cohort's errors, with keys derived from the forward ones."""
    return _quantize(grad, mix_key(keys, _BACKWARD_SALT), (bb, be, bl, bs, br))


@_activation.register_fake
def _(x, keys, *spec):
    return torch.empty_like(x)


@_error.register_fake
def _(grad, keys, *spec):
    return torch.empty_like(grad)


def _setup_context(ctx, inputs, output) -> None:
    ctx.save_for_backward(inputs[1])
    ctx.error_spec = inputs[7:]


def _backward(ctx, grad: Tensor):
    (keys,) = ctx.saved_tensors
    return (_error(grad, keys, *ctx.error_spec),) + (None,) * 11


_activation.register_autograd(_backward, setup_context=_setup_context)


def _clients_first(info, in_dims, x: Tensor, keys: Tensor) -> tuple[Tensor, Tensor]:
    x = x.movedim(in_dims[0], 0) if in_dims[0] is not None else x.expand(info.batch_size, *x.shape)
    keys = keys.movedim(in_dims[1], 0) if in_dims[1] is not None else keys.expand(info.batch_size)
    return x, keys


@_activation.register_vmap
def _(info, in_dims, x, keys, *spec):
    return _activation(*_clients_first(info, in_dims, x, keys), *spec), 0


@_error.register_vmap
def _(info, in_dims, grad, keys, *spec):
    return _error(*_clients_first(info, in_dims, grad, keys), *spec), 0


def quantize_client_activation(x: Tensor, key: Tensor, forward: BFPFormat | None,
                               backward: BFPFormat | None) -> Tensor:
    """:func:`lptfl.quant.activation.quantize_activation` for one client under vmap: ``x`` and
    ``key`` (0-d int32) are that client's (batched) views."""
    return _activation(x, key, *_spec(forward), *_spec(backward))
