"""The block-floating-point number format (as in SWALP and the LPT-FL paper).

A value is an integer mantissa of ``bits`` bits (sign included, two's complement range)
times a power of two shared by its block. The block's exponent is ``floor(log2(max|x|))``
over the block, clamped to the range that ``exp_bits`` bits can hold.
"""

from __future__ import annotations

from dataclasses import dataclass

LAYOUTS = ("tensor", "B", "BC")
SMALL_BLOCKS = ("FC", "Conv", "None")
ROUNDINGS = ("stochastic", "nearest")

_SMALL_BLOCK_MAX_NDIM = {"FC": 1, "Conv": 2}


@dataclass(frozen=True)
class BFPFormat:
    """A block-floating-point format.

    Args:
        bits: word length of a mantissa, sign included (2-16).
        exp_bits: bits of the shared block exponent (1-8); the exponent is clamped to
            ``[-2**(exp_bits-1), 2**(exp_bits-1) - 1]``.
        layout: ``"tensor"`` (one exponent for the whole tensor), ``"B"`` (one per index of
            dim 0, e.g. per output channel) or ``"BC"`` (one per ``(dim0, dim1)`` slice, e.g.
            per (out, in) channel pair of a conv kernel).
        small_block: which tensors fall back to a single block whatever the layout:
            ``"FC"`` tensors with ndim <= 1 (biases, norm affine parameters), ``"Conv"``
            tensors with ndim <= 2, ``"None"`` every tensor.
        rounding: ``"stochastic"`` (``floor(q + u)``, ``u ~ U[0, 1)`` per element) or
            ``"nearest"`` (round half to even).
    """

    bits: int
    exp_bits: int = 8
    layout: str = "BC"
    small_block: str = "FC"
    rounding: str = "stochastic"

    def __post_init__(self) -> None:
        if isinstance(self.bits, bool) or not isinstance(self.bits, int) or not 2 <= self.bits <= 16:
            raise ValueError(f"bits must be a Python int in [2, 16] (sign included), got {self.bits!r}")
        if (
            isinstance(self.exp_bits, bool)
            or not isinstance(self.exp_bits, int)
            or not 1 <= self.exp_bits <= 8
        ):
            raise ValueError(f"exp_bits must be a Python int in [1, 8], got {self.exp_bits!r}")
        if self.layout not in LAYOUTS:
            raise ValueError(f"layout must be one of {LAYOUTS}, got {self.layout!r}")
        if self.small_block not in SMALL_BLOCKS:
            raise ValueError(f"small_block must be one of {SMALL_BLOCKS}, got {self.small_block!r}")
        if self.rounding not in ROUNDINGS:
            raise ValueError(f"rounding must be one of {ROUNDINGS}, got {self.rounding!r}")

    @property
    def mantissa_min(self) -> int:
        """Smallest integer mantissa, ``-2**(bits-1)``."""
        return -(1 << (self.bits - 1))

    @property
    def mantissa_max(self) -> int:
        """Largest integer mantissa, ``2**(bits-1) - 1``."""
        return (1 << (self.bits - 1)) - 1

    @property
    def exp_min(self) -> int:
        """Smallest block exponent, ``-2**(exp_bits-1)``."""
        return -(1 << (self.exp_bits - 1))

    @property
    def exp_max(self) -> int:
        """Largest block exponent, ``2**(exp_bits-1) - 1``."""
        return (1 << (self.exp_bits - 1)) - 1

    def block_layout(self, ndim: int) -> str:
        """The layout actually used for a tensor with ``ndim`` dimensions.

        Small tensors (see ``small_block``) and tensors with too few dimensions for the
        layout use a single block (``"tensor"``).
        """
        if self.small_block == "None" or self.layout == "tensor":
            return "tensor"
        if ndim <= _SMALL_BLOCK_MAX_NDIM[self.small_block]:
            return "tensor"
        if self.layout == "BC" and ndim < 2:
            return "tensor"
        return self.layout

    def block_reduce_dims(self, ndim: int) -> tuple[int, ...]:
        """Dimensions over which one block extends, for a tensor with ``ndim`` dimensions."""
        layout = self.block_layout(ndim)
        if layout == "tensor":
            return tuple(range(ndim))
        first_free = 1 if layout == "B" else 2
        return tuple(range(first_free, ndim))

    def num_blocks(self, shape: tuple[int, ...]) -> int:
        """Number of blocks (exponents) a tensor of ``shape`` has in this format."""
        layout = self.block_layout(len(shape))
        if layout == "tensor":
            return 1
        if layout == "B":
            return shape[0]
        return shape[0] * shape[1]

    def with_rounding(self, rounding: str) -> "BFPFormat":
        """This format with another rounding mode."""
        return BFPFormat(
            self.bits,
            exp_bits=self.exp_bits,
            layout=self.layout,
            small_block=self.small_block,
            rounding=rounding,
        )

    @property
    def name(self) -> str:
        """A short name, e.g. ``bfp8-BC-FC-stochastic``."""
        return f"bfp{self.bits}e{self.exp_bits}-{self.layout}-{self.small_block}-{self.rounding}"

    @property
    def wire_name(self) -> str:
        """The name without the rounding (which a payload does not record), e.g. ``bfp8e8-BC-FC``."""
        return f"bfp{self.bits}e{self.exp_bits}-{self.layout}-{self.small_block}"
