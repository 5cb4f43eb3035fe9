"""Split a float tensor into block-floating-point mantissas and block exponents, and back.

A value on the grid of :class:`~lptfl.quant.format.BFPFormat` ``fmt`` is
``m * 2**(e - (bits - 2))`` with ``m`` a ``bits``-bit two's-complement integer and ``e`` its
block's exponent. :func:`split` finds ``(m, e)`` for every value; :func:`join` rebuilds the
tensor. Everything is vectorised in torch on float32: multiplying by a power of two is
exact unless the product underflows, and an underflowing product is below 2**-126, so it
rounds to a zero mantissa either way.
"""

from __future__ import annotations

import torch

from lptfl.quant.format import BFPFormat
from lptfl.quant.quantize import block_exponent, pow2_normal, quantize, split_shift

# Largest block exponent whose values always fit the dtype; above it we check for overflow.
_SAFE_EXPONENT = {torch.float32: 126, torch.bfloat16: 126, torch.float16: 14}


def pow2_f32(k: torch.Tensor) -> torch.Tensor:
    """``2.0 ** k`` exactly, as float32, for integer ``k`` in ``[-149, 127]`` (subnormals included)."""
    return ((k.to(torch.int64) + 1023) << 52).view(torch.float64).to(torch.float32)


def _scale(x: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """``x * 2**k`` for float32 ``x`` and int32 ``k`` in ``[-252, 227]``, exact unless it underflows.

    The same two factors as :func:`~lptfl.quant.quantize.quantize` uses, so the products
    are bit-identical to its scaled values.
    """
    low, high = split_shift(k)
    out = x * pow2_normal(low)
    if bool((high != 0).any()):
        out = out * pow2_normal(high)
    return out


def mantissa_dtype(bits: int) -> torch.dtype:
    """Smallest integer dtype that holds a ``bits``-bit two's-complement mantissa."""
    return torch.int8 if bits <= 8 else torch.int16


def block_shape(shape: tuple[int, ...], fmt: BFPFormat) -> tuple[int, ...]:
    """Shape of the exponent array, broadcastable against a tensor of ``shape``.

    ``(1,) * ndim`` for one block, ``(d0, 1, ...)`` for ``"B"``, ``(d0, d1, 1, ...)`` for
    ``"BC"`` (the layout actually used, see :meth:`BFPFormat.block_layout`).
    """
    ndim = len(shape)
    free = {"tensor": 0, "B": 1, "BC": 2}[fmt.block_layout(ndim)]
    return tuple(shape[:free]) + (1,) * (ndim - free)


def num_exponents(shape: tuple[int, ...], fmt: BFPFormat) -> int:
    """Exponents stored for a tensor of ``shape``: one per block, none if it is empty."""
    numel = 1
    for d in shape:
        numel *= d
    if numel == 0:
        return 0
    return fmt.num_blocks(tuple(shape))


def split(
    x: torch.Tensor, fmt: BFPFormat, *, generator: torch.Generator | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Mantissas (int8 or int16, shape of ``x``) and block exponents (int32, :func:`block_shape`).

    If every block of ``x`` is exactly representable, the result is exact: with the block's
    canonical exponent ``floor(log2(max|x|))`` (clamped), or one below it for a block whose
    largest magnitude is ``-2**e`` held as mantissa ``-2**(bits-1)`` (``quantize`` can
    produce such blocks). Otherwise the whole tensor is rounded exactly as
    :func:`~lptfl.quant.quantize` does: to nearest, or with ``fmt``'s stochastic rounding
    when ``generator`` is given and ``fmt.rounding == "stochastic"``.

    Blocks whose mantissas are all zero get the smallest exponent of the other blocks (any
    exponent decodes zeros), so that they do not widen the exponent range.

    Raises:
        ValueError: ``x`` holds NaN or infinity.
    """
    x32 = x.detach().to(device="cpu", dtype=torch.float32).contiguous()
    mdtype = mantissa_dtype(fmt.bits)
    if x32.numel() == 0:
        return torch.zeros(x32.shape, dtype=mdtype), torch.zeros(0, dtype=torch.int32)
    bshape = block_shape(tuple(x32.shape), fmt)
    nblocks = 1
    for d in bshape:
        nblocks *= d
    x2 = x32.view(nblocks, -1)  # one row per block (blocks are contiguous in C order)
    amax = x2.abs().amax(dim=1, keepdim=True)
    if not bool(torch.isfinite(amax).all()):
        raise ValueError("holds NaN or infinite values, which block floating point cannot carry")
    e0 = block_exponent(amax, fmt)
    shift0 = (fmt.bits - 2) - e0
    q = _scale(x2, shift0)
    r = torch.round(q)
    lo, hi = float(fmt.mantissa_min), float(fmt.mantissa_max)
    exact = q == r
    # Below the top of the exponent range |q| < 2**(bits-1), so an integer q is in range.
    if bool((e0 == fmt.exp_max).any()):
        exact &= (r >= lo) & (r <= hi)
    ok0 = exact.all(dim=1, keepdim=True)
    m, e = r, e0
    if not bool(ok0.all()):
        # A block can only need exponent e0 - 1 if its max is exactly 2**e0 (held as -2**e0).
        bad = ~ok0
        maybe = bad & (amax == pow2_f32(e0)) & (e0 > fmt.exp_min)
        rows = None
        if bool((maybe == bad).all()):
            rows = bad.view(-1).nonzero().view(-1)
            q1 = q.index_select(0, rows) * 2.0
            if not bool(((q1 == torch.round(q1)) & (q1 >= lo) & (q1 <= hi)).all()):
                rows = None
        if rows is not None:  # on the grid after all
            m = r.index_copy_(0, rows, q1)
            e = e0.index_put((rows,), e0.index_select(0, rows) - 1)
        elif generator is not None and fmt.rounding == "stochastic":
            m = _scale(quantize(x32, fmt, generator=generator).view(nblocks, -1), shift0)
            # The one value quantize cannot hold in float32: -2**(bits-1) at exponent 127.
            m = torch.where(torch.isneginf(m), lo, m)
        else:  # nearest rounding, computed exactly as quantize does
            m = r.clamp(lo, hi)
    mantissas = m.to(mdtype).view(x32.shape)
    # A block has a non-zero mantissa if its max is non-zero, unless its exponent was
    # clamped up to exp_min (tiny values may all round to zero).
    nonzero = amax > 0
    if bool((nonzero & (e0 == fmt.exp_min)).any()):
        nonzero = (m != 0).any(dim=1, keepdim=True)
    if not bool(nonzero.all()):
        fill = e[nonzero].min() if bool(nonzero.any()) else fmt.exp_min
        e = torch.where(nonzero, e, fill)
    return mantissas, e.to(torch.int32).view(bshape)


def join(
    mantissas: torch.Tensor, exponents: torch.Tensor, fmt: BFPFormat, dtype: torch.dtype
) -> torch.Tensor:
    """``mantissas * 2**(exponents - (bits - 2))`` cast to ``dtype`` (via exact float32).

    Args:
        mantissas: integer tensor with the tensor's shape.
        exponents: integer tensor of :func:`block_shape` (broadcastable).
    """
    values = mantissas.to(torch.float32) * pow2_f32(exponents.to(torch.int64) - (fmt.bits - 2))
    return values.to(dtype)


def may_overflow(exponents: torch.Tensor, dtype: torch.dtype) -> bool:
    """Whether a block with these exponents could hold a value that overflows ``dtype``."""
    return exponents.numel() > 0 and int(exponents.max()) > _SAFE_EXPONENT[dtype]
