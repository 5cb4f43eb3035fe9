"""Bit packing of unsigned integers of a fixed width (0-16 bits) into bytes.

Order (see ``docs/wire-format.md``): value ``i`` occupies stream bits
``[i * width, (i + 1) * width)``, least significant bit first, and stream bit ``j`` is bit
``j % 8`` (LSB = 0) of byte ``j // 8``. Equivalently the stream is the little-endian byte
encoding of the integer ``sum(v[i] << (i * width))``. The last byte's unused high bits are
zero. ``ceil(n * width / 8)`` bytes in all.

All operations are vectorised numpy; nothing loops per value.
"""

from __future__ import annotations

import numpy as np

MAX_WIDTH = 16


def packed_size(count: int, width: int) -> int:
    """Bytes taken by ``count`` values of ``width`` bits."""
    return (count * width + 7) // 8


def pack(values: np.ndarray, width: int) -> np.ndarray:
    """Pack unsigned ``values`` (each ``< 2**width``) into a uint8 array.

    Args:
        values: 1-D array of non-negative integers; only the low ``width`` bits are kept.
        width: bits per value, 0-16 (0 gives an empty stream).
    """
    if not 0 <= width <= MAX_WIDTH:
        raise ValueError(f"width must be in [0, {MAX_WIDTH}], got {width}")
    values = np.asarray(values).reshape(-1)
    n = values.size
    nbytes = packed_size(n, width)
    if width == 0 or n == 0:
        return np.zeros(0, dtype=np.uint8)
    mask = (1 << width) - 1
    if width == 8:
        return (values & mask).astype(np.uint8)
    if width == 16:
        return (values & mask).astype("<u2").view(np.uint8)
    if width in (1, 2, 4):
        # 8 // width values per byte.
        per = 8 // width
        padded = np.zeros(-(-n // per) * per, dtype=np.uint8)
        padded[:n] = values & mask
        cols = padded.reshape(-1, per)
        out = cols[:, 0].copy()
        for k in range(1, per):
            out |= cols[:, k] << np.uint8(k * width)
        return out
    if width < 8:
        # 8 values of `width` bits fill exactly `width` bytes: build each group as a uint64.
        groups = -(-n // 8)
        padded = np.zeros(groups * 8, dtype=np.uint8)
        padded[:n] = values & mask
        cols = padded.reshape(groups, 8)
        words = cols[:, 0].astype(np.uint64)
        for k in range(1, 8):
            words |= cols[:, k].astype(np.uint64) << np.uint64(k * width)
        out = words.astype("<u8").view(np.uint8).reshape(groups, 8)[:, :width]
        return np.ascontiguousarray(out).reshape(-1)[:nbytes]
    # 9..15 bits: 8 values fill `width` bytes, built as two uint64 words (bits 0-63, 64-127).
    groups = -(-n // 8)
    padded = np.zeros(groups * 8, dtype=np.uint64)
    padded[:n] = values & mask
    cols = padded.reshape(groups, 8)
    lo = np.zeros(groups, dtype=np.uint64)
    hi = np.zeros(groups, dtype=np.uint64)
    for k in range(8):
        off = k * width
        if off < 64:
            lo |= cols[:, k] << np.uint64(off)
            if off + width > 64:
                hi |= cols[:, k] >> np.uint64(64 - off)
        else:
            hi |= cols[:, k] << np.uint64(off - 64)
    out = np.empty((groups, 16), dtype=np.uint8)
    out[:, :8] = lo.astype("<u8").view(np.uint8).reshape(groups, 8)
    out[:, 8:] = hi.astype("<u8").view(np.uint8).reshape(groups, 8)
    return np.ascontiguousarray(out[:, :width]).reshape(-1)[:nbytes]


def padding_is_zero(stream: np.ndarray, count: int, width: int) -> bool:
    """Whether the unused high bits of the last byte of a packed stream are zero."""
    used = (count * width) % 8
    if used == 0 or stream.size == 0:
        return True
    return int(stream[-1]) >> used == 0


def unpack(stream: np.ndarray, width: int, count: int) -> np.ndarray:
    """Inverse of :func:`pack`: ``count`` unsigned values (uint16, or uint8 for width <= 8).

    ``stream`` must hold exactly ``packed_size(count, width)`` bytes (checked by the caller).
    """
    if not 0 <= width <= MAX_WIDTH:
        raise ValueError(f"width must be in [0, {MAX_WIDTH}], got {width}")
    stream = np.asarray(stream, dtype=np.uint8).reshape(-1)
    if stream.size != packed_size(count, width):
        raise ValueError(f"expected {packed_size(count, width)} bytes, got {stream.size}")
    if width == 0 or count == 0:
        return np.zeros(count, dtype=np.uint8)
    if width == 8:
        return stream.copy()
    if width == 16:
        return stream.view("<u2").astype(np.uint16)
    if width in (1, 2, 4):
        per = 8 // width
        mask8 = np.uint8((1 << width) - 1)
        out = np.empty((stream.size, per), dtype=np.uint8)
        for k in range(per):
            out[:, k] = (stream >> np.uint8(k * width)) & mask8
        return out.reshape(-1)[:count]
    if width < 8:
        groups = -(-count // 8)
        buf = np.zeros((groups, 8), dtype=np.uint8)
        padded = np.zeros(groups * width, dtype=np.uint8)
        padded[: stream.size] = stream
        buf[:, :width] = padded.reshape(groups, width)
        words = buf.view("<u8").reshape(groups)
        mask64 = np.uint64((1 << width) - 1)
        out = np.empty((groups, 8), dtype=np.uint8)
        for k in range(8):
            out[:, k] = (words >> np.uint64(k * width)) & mask64
        return out.reshape(-1)[:count]
    groups = -(-count // 8)
    buf = np.zeros((groups, 16), dtype=np.uint8)
    padded = np.zeros(groups * width, dtype=np.uint8)
    padded[: stream.size] = stream
    buf[:, :width] = padded.reshape(groups, width)
    words = buf.view("<u8").reshape(groups, 2)
    lo, hi = words[:, 0], words[:, 1]
    mask64 = np.uint64((1 << width) - 1)
    out = np.empty((groups, 8), dtype=np.uint16)
    for k in range(8):
        off = k * width
        if off < 64:
            v = lo >> np.uint64(off)
            if off + width > 64:
                v = v | (hi << np.uint64(64 - off))
        else:
            v = hi >> np.uint64(off - 64)
        out[:, k] = v & mask64
    return out.reshape(-1)[:count]


def to_unsigned(values: np.ndarray, width: int) -> np.ndarray:
    """Two's-complement bit patterns (low ``width`` bits) of signed integers (int8/int16 in, same-size unsigned out)."""
    v = np.asarray(values)
    if v.dtype == np.int8:
        u = v.view(np.uint8)
    elif v.dtype == np.int16:
        u = v.view(np.uint16)
    else:
        u = v.astype(np.int64)
    return u if width in (8, 16) and u.dtype.itemsize * 8 == width else u & ((1 << width) - 1)


def to_signed(values: np.ndarray, width: int) -> np.ndarray:
    """Sign-extend ``width``-bit two's-complement patterns (unsigned) to int8 (width <= 8) or int16."""
    v = np.asarray(values)
    if width == 8:
        return v.astype(np.uint8).view(np.int8)
    if width == 16:
        return v.astype(np.uint16).view(np.int16)
    out_dtype = np.int8 if width <= 8 else np.int16
    half = 1 << (width - 1)
    return ((v.astype(np.int16) ^ half) - half).astype(out_dtype)
