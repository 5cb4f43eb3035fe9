"""Round trips: on-grid tensors are lossless, off-grid tensors come back quantized."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from _codec_helpers import on_grid_reference, same_bits
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from lptfl.codec import bitpack, decode, encode
from lptfl.quant.format import LAYOUTS, SMALL_BLOCKS, BFPFormat
from lptfl.quant.quantize import quantize

SETTINGS = settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.too_slow])

bits_st = st.one_of(st.sampled_from([2, 3, 4, 5, 6, 7, 8, 16]), st.integers(2, 16))
fmt_st = st.builds(
    BFPFormat,
    bits_st,
    exp_bits=st.sampled_from([8, 8, 8, 5, 3, 1]),
    layout=st.sampled_from(LAYOUTS),
    small_block=st.sampled_from(SMALL_BLOCKS),
    rounding=st.sampled_from(["stochastic", "nearest"]),
)
shape_st = st.lists(st.integers(0, 5), min_size=0, max_size=4).map(tuple)
dtype_st = st.sampled_from([torch.float32, torch.bfloat16, torch.float16])


@st.composite
def tensors(draw, dtype=None):
    """Random tensors with mixed magnitudes, zero blocks, zeros and powers of two."""
    shape = draw(shape_st)
    dtype = dtype or draw(dtype_st)
    gen = torch.Generator().manual_seed(draw(st.integers(0, 2**31 - 1)))
    lo, hi = (-20, 12) if dtype == torch.float16 else (-140, 120)
    scale = 2.0 ** draw(st.integers(lo, hi))
    x = torch.randn(shape, generator=gen, dtype=torch.float64) * scale
    if draw(st.booleans()):  # spread magnitudes inside blocks
        x = x * torch.exp2(torch.randint(-12, 4, shape, generator=gen).to(torch.float64))
    if x.ndim and x.shape[0] and draw(st.booleans()):  # a zero block along dim 0
        x[draw(st.integers(0, x.shape[0] - 1))] = 0
    if draw(st.booleans()):  # scattered zeros and negative powers of two
        r = torch.rand(shape, generator=gen, dtype=torch.float64)
        x = torch.where(r < 0.2, torch.zeros_like(x), x)
        x = torch.where(r > 0.85, -(2.0 ** torch.round(torch.log2(x.abs() + 1e-300))), x)
    if dtype == torch.float16:
        x = x.clamp(-6e4, 6e4)
    return x.to(dtype)


def _fits_dtype(fmt: BFPFormat, dtype: torch.dtype) -> bool:
    """Whether ``quantize``'s float32 result is always exact in ``dtype`` (no rounding on the cast)."""
    return dtype == torch.float32 or fmt.bits <= (8 if dtype == torch.bfloat16 else 11)


@SETTINGS
@given(fmt=fmt_st, x=tensors(), seed=st.integers(0, 2**31 - 1))
def test_quantized_tensors_round_trip_bit_for_bit(fmt, x, seed):
    q = quantize(x, fmt, generator=torch.Generator().manual_seed(seed))
    if not bool(torch.isfinite(q).all()):  # quantize overflowed the dtype (fp16 near 65504)
        with pytest.raises(ValueError):
            encode({"w": q}, fmt)
        return
    out = decode(encode({"w": q}, fmt))["w"]
    assert out.dtype == q.dtype and out.shape == q.shape
    if _fits_dtype(fmt, q.dtype):
        assert same_bits(out, q)  # quantize never outputs -0.0, so this is bit for bit
    # In any case: on-grid input is kept, anything else is rounded to nearest.
    expected = q if on_grid_reference(q, fmt) else quantize(q, fmt.with_rounding("nearest"))
    assert same_bits(out, expected, signed_zero=False)


@SETTINGS
@given(fmt=fmt_st, x=tensors())
def test_off_grid_tensors_are_rounded_to_nearest(fmt, x):
    expected = x if on_grid_reference(x, fmt) else quantize(x, fmt.with_rounding("nearest"))
    if not bool(torch.isfinite(expected).all()):
        with pytest.raises(ValueError, match="overflow"):
            encode({"w": x}, fmt)
        return
    out = decode(encode({"w": x}, fmt))["w"]
    assert same_bits(out, expected, signed_zero=False)


@pytest.mark.parametrize("bits", [2, 3, 4, 5, 6, 7, 8, 12, 16])
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("small_block", SMALL_BLOCKS)
def test_every_word_length_and_layout_on_model_shapes(bits, layout, small_block):
    gen = torch.Generator().manual_seed(bits)
    fmt = BFPFormat(bits, layout=layout, small_block=small_block)
    state = {
        "conv": quantize(torch.randn(8, 4, 3, 3, generator=gen) * 0.1, fmt, generator=gen),
        "fc": quantize(torch.randn(5, 16, generator=gen), fmt, generator=gen),
        "bias": quantize(torch.randn(8, generator=gen) * 1e-3, fmt, generator=gen),
        "scalar": quantize(torch.tensor(-0.75), fmt, generator=gen),
        "zeros": torch.zeros(3, 2, 2),
        "empty": torch.zeros(0, 4),
    }
    out = decode(encode(state, fmt))
    assert list(out) == list(state)
    for name, t in state.items():
        assert same_bits(out[name], t), name


def test_negative_power_of_two_block_uses_the_exponent_below():
    # quantize can round -1.99 up to -2 = -128 * 2**-6 with block exponent 0, where the
    # block's own max (2.0) would give exponent 1; the encoder must still be exact.
    fmt = BFPFormat(8, layout="tensor", rounding="nearest")
    x = torch.tensor([-1.999, 0.515625, 1.0])
    q = quantize(x, fmt)
    assert q[0].item() == -2.0 and q[1].item() == 0.515625  # 33 * 2**-6: odd at exponent 1
    assert same_bits(decode(encode({"w": q}, fmt))["w"], q)


def test_zero_blocks_do_not_widen_the_exponent_field():
    fmt = BFPFormat(8, layout="B")
    x = torch.randn(16, 32)
    x[3] = 0
    payload = encode({"w": quantize(x, fmt)}, fmt)
    y = torch.randn(16, 32)
    y[3] = 1e-30  # a tiny but non-zero block does widen it
    assert len(encode({"w": quantize(y, fmt)}, fmt)) > len(payload)


def test_stochastic_rounding_with_generator_matches_quantize():
    fmt = BFPFormat(6, layout="BC", rounding="stochastic")
    x = torch.randn(8, 8, 3, 3)
    out = decode(encode({"w": x}, fmt, generator=torch.Generator().manual_seed(5)))["w"]
    assert same_bits(out, quantize(x, fmt, generator=torch.Generator().manual_seed(5)), signed_zero=False)
    other = decode(encode({"w": x}, fmt, generator=torch.Generator().manual_seed(6)))["w"]
    assert not torch.equal(out, other)
    nearest = decode(encode({"w": x}, fmt))["w"]  # no generator: nearest rounding
    assert same_bits(nearest, quantize(x, fmt.with_rounding("nearest")), signed_zero=False)


@SETTINGS
@given(width=st.integers(0, 16), values=st.lists(st.integers(0, 2**16 - 1), max_size=70))
def test_bitpack_matches_big_integer_reference(width, values):
    v = np.array([x & ((1 << width) - 1) for x in values], dtype=np.int64)
    reference = sum(int(x) << (i * width) for i, x in enumerate(v))
    nbytes = bitpack.packed_size(len(v), width)
    packed = bitpack.pack(v, width)
    assert packed.tobytes() == reference.to_bytes(nbytes, "little")
    assert np.array_equal(bitpack.unpack(packed, width, len(v)).astype(np.int64), v)
    assert bitpack.padding_is_zero(packed, len(v), width)


@given(width=st.integers(2, 16), values=st.lists(st.integers(-(2**15), 2**15 - 1), max_size=40))
@settings(max_examples=60, deadline=None)
def test_twos_complement_round_trip(width, values):
    lo, hi = -(1 << (width - 1)), (1 << (width - 1)) - 1
    m = np.clip(np.array(values, dtype=np.int64), lo, hi).astype(np.int8 if width <= 8 else np.int16)
    u = bitpack.to_unsigned(m, width)
    assert np.all(u < (1 << width))
    assert np.array_equal(bitpack.to_signed(bitpack.unpack(bitpack.pack(u, width), width, m.size), width), m)


@settings(max_examples=60, deadline=None)
@given(
    bits=st.integers(2, 4),
    layout=st.sampled_from(["B", "BC"]),
    dtype=dtype_st,
    seed=st.integers(0, 2**31 - 1),
)
def test_blocks_rounded_to_the_most_negative_mantissa_stay_exact(bits, layout, dtype, seed):
    # With few bits many blocks hold -2**(bits-1) * 2**(e-(bits-2)) = -2**(e+1): their own
    # max suggests exponent e+1, yet only exponent e represents them.
    fmt = BFPFormat(bits, layout=layout, rounding="nearest")
    q = quantize(torch.randn(6, 5, 2, generator=torch.Generator().manual_seed(seed)).to(dtype), fmt)
    assert same_bits(decode(encode({"w": q}, fmt))["w"], q)
