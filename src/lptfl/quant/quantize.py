"""Block-floating-point quantization: ``quantize(x, fmt)``.

For each block (see :class:`BFPFormat`): ``e = floor(log2(max|x|))`` clamped to the
exponent range, ``s = 2**(e - (bits - 2))``, ``q = x / s`` rounded (half to even, or
``floor(q + u)``), clamped to the mantissa range, result ``q * s``. A block whose max is 0
stays exactly 0.

Non-finite input: a block holding a NaN or an infinity comes out as NaN in every element
(the result is always either on the grid or NaN; nothing is silently clipped).

Everything is element-wise or a block reduction on the input's device: no host
synchronisation, so the function can be fused by ``torch.compile`` and runs on CUDA.
"""

from __future__ import annotations

import torch

from lptfl.quant.format import BFPFormat
from lptfl.quant.random import check_generator, draw_key, hashed_uniform_cohort, hashed_uniform_like

_FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def pow2_normal(k: torch.Tensor) -> torch.Tensor:
    """``2.0 ** k`` exactly, as float32, for int32 ``k`` in ``[-126, 127]``."""
    return ((k + 127) << 23).view(torch.float32)


def split_shift(k: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(low, high)`` with ``low + high = k`` and both ``2**low`` and ``2**high`` normal float32, for
    int32 ``k`` in ``[-252, 227]``: a scale ``2**k`` is applied as two exact factors."""
    low = k.clamp(-126, 100)
    return low, k - low


def block_exponent(amax: torch.Tensor, fmt: BFPFormat) -> torch.Tensor:
    """``floor(log2(amax))`` clamped to the format's exponent range (int32, same shape).

    Read straight from the float32 bit pattern, so it is exact at powers of two.
    """
    biased = (amax.view(torch.int32) >> 23) & 0xFF
    subnormal = torch.where(amax >= 2.0**-127, -127, -128).to(torch.int32)
    exponent = torch.where(biased == 0, subnormal, biased - 127)
    return exponent.clamp(fmt.exp_min, fmt.exp_max)


def block_amax(x: torch.Tensor, fmt: BFPFormat, cohort: bool = False) -> torch.Tensor:
    """Per-block ``max|x|`` of float32 ``x``, with keepdim shape for broadcasting.

    With ``cohort`` dim 0 indexes clients (``K x ...``): blocks are those of each client's
    tensor ``x[k]``, so no block spans two clients.
    """
    lead = int(cohort)
    dims = tuple(d + lead for d in fmt.block_reduce_dims(x.ndim - lead))
    if not dims:
        return x.abs()
    return x.abs().amax(dim=dims, keepdim=True)


def block_factors(xf: torch.Tensor, fmt: BFPFormat, cohort: bool = False) -> torch.Tensor:
    """The per-block scale factors of float32 ``xf``, stacked: ``(4, *keepdim block shape)``.

    ``[up_low, up_high, down_low, down_high]``: ``x * up_low * up_high`` is the unrounded
    mantissa and ``q * down_low * down_high`` the value of mantissa ``q`` (each scale split into
    two normal float32 factors). ``down_low`` is NaN for a block holding a NaN or an infinity.
    Stacking realises the factors as one small buffer, so a fused kernel reads them instead of
    recomputing them from the block maximum for every vector of elements. ``cohort``: as in
    :func:`block_amax`.
    """
    amax = block_amax(xf, fmt, cohort)
    shift = (fmt.bits - 2) - block_exponent(amax, fmt)
    low, high = split_shift(shift)
    nan_or_one = torch.where(torch.isfinite(amax), 1.0, torch.nan)
    return torch.stack([pow2_normal(low), pow2_normal(high), pow2_normal(-low) * nan_or_one, pow2_normal(-high)])


def quantize_with_key(x: torch.Tensor, fmt: BFPFormat, key: torch.Tensor | None, *,
                      cohort: bool = False) -> torch.Tensor:
    """:func:`quantize` with an explicit int32 rounding key (``None`` for nearest rounding).

    With ``cohort``, ``x`` is ``K x ...`` (client ``k``'s tensor is ``x[k]``) and ``key`` holds
    the ``K`` clients' keys: row ``k`` of the result equals ``quantize_with_key(x[k], fmt, key[k])``.
    """
    xf = x.to(torch.float32)
    factors = block_factors(xf, fmt, cohort)
    q = xf * factors[0]  # a new tensor: the in-place steps below never touch x
    q.mul_(factors[1])
    if fmt.rounding == "nearest":
        q.round_()
    else:
        if key is None:
            raise ValueError("stochastic rounding needs a key")
        q.add_(hashed_uniform_cohort(q, key) if cohort else hashed_uniform_like(q, key)).floor_()
    q.clamp_(fmt.mantissa_min, fmt.mantissa_max).add_(0.0)  # + 0.0 turns -0.0 into +0.0
    q.mul_(factors[2]).mul_(factors[3])  # NaN for a non-finite block
    return q.to(x.dtype)


def check_quantizable(x: torch.Tensor, fmt: BFPFormat) -> None:
    """Raise ``TypeError`` unless ``x`` is a dense float32/bf16/fp16 tensor and ``fmt`` a BFPFormat."""
    if not isinstance(fmt, BFPFormat):
        raise TypeError(f"fmt must be a BFPFormat, got {type(fmt).__name__}")
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"x must be a torch.Tensor, got {type(x).__name__}")
    if x.dtype not in _FLOAT_DTYPES:
        raise TypeError(f"x must have dtype float32, bfloat16 or float16, got {x.dtype}")
    if x.layout != torch.strided:
        raise TypeError(f"x must be a dense tensor, got layout {x.layout} (convert it with .to_dense())")
    if x.numel() >= 1 << 31:
        raise ValueError(f"x has {x.numel()} elements; at most 2**31 - 1 are supported")


def quantize(x: torch.Tensor, fmt: BFPFormat, *, generator: torch.Generator | None = None) -> torch.Tensor:
    """Round ``x`` onto the block-floating-point grid of ``fmt``.

    Args:
        x: float32, bfloat16 or float16 tensor of any shape, on any device.
        fmt: the format (word length, exponent bits, layout, rounding).
        generator: source of the stochastic-rounding key (a seeded generator gives
            reproducible rounding); ignored for nearest rounding. Must live on ``x``'s
            device type; the default generator is used when ``None``.

    Returns:
        A tensor of the same shape and dtype whose values are ``mantissa * 2**(e-(bits-2))``.

    Raises:
        TypeError: ``x`` is not a dense float tensor, ``fmt`` not a BFPFormat, or ``generator``
            not a torch.Generator.
    """
    check_quantizable(x, fmt)
    check_generator(generator)
    if x.numel() == 0:
        return x.clone()
    key = None
    if fmt.rounding == "stochastic":
        key = draw_key(generator, x.device)
    return quantize_with_key(x, fmt, key)
