"""The outer frame of an lptfl-wire payload.

::

    offset  size  field
    0       4     magic b"LPTW"
    4       1     version (1)
    5       1     flags: bit 0 = body is one zstd frame; other bits 0
    6       2     reserved, 0
    8       8     body length N, unsigned little-endian
    16      N     body: a safetensors file (or its zstd compression)
    16+N    4     CRC-32 (ISO-HDLC, as zlib.crc32) of bytes [0, 16+N), unsigned little-endian
"""

from __future__ import annotations

import struct
import zlib

import zstandard

from lptfl.codec.errors import PayloadError

MAGIC = b"LPTW"
FRAME_VERSION = 1
FLAG_ZSTD = 0x01
HEADER = struct.Struct("<4sBBHQ")
HEADER_SIZE = HEADER.size  # 16
TRAILER_SIZE = 4
ZSTD_LEVEL = 3


def wrap(body: bytes, *, compress: bool) -> bytes:
    """Frame a safetensors ``body``, zstd-compressing it first if ``compress``."""
    flags = 0
    if compress:
        body = zstandard.ZstdCompressor(level=ZSTD_LEVEL, write_content_size=True).compress(body)
        flags |= FLAG_ZSTD
    head = HEADER.pack(MAGIC, FRAME_VERSION, flags, 0, len(body))
    crc = zlib.crc32(body, zlib.crc32(head))
    return b"".join((head, body, struct.pack("<I", crc)))


def _zstd_frame_size(body: memoryview) -> int:
    """Bytes taken by the zstd frame at the start of ``body`` (walks the block headers)."""
    try:
        pos = zstandard.frame_header_size(bytes(body[:18]))
        has_checksum = zstandard.get_frame_parameters(bytes(body[:18])).has_checksum
    except zstandard.ZstdError as exc:
        raise PayloadError(f"zstd body: bad frame header ({exc})") from None
    n = len(body)
    while True:
        if pos + 3 > n:
            raise PayloadError("zstd body: truncated block header")
        header = body[pos] | (body[pos + 1] << 8) | (body[pos + 2] << 16)
        pos += 3
        last, kind, size = header & 1, (header >> 1) & 3, header >> 3
        if kind == 3:
            raise PayloadError("zstd body: reserved block type")
        pos += 1 if kind == 1 else size
        if pos > n:
            raise PayloadError("zstd body: truncated block")
        if last:
            break
    return pos + (4 if has_checksum else 0)


def unwrap(payload: bytes | bytearray | memoryview, *, max_bytes: int) -> bytes:
    """Check the frame of ``payload`` and return its (decompressed) body.

    Raises:
        PayloadError: truncated, wrong magic/version/flags, length or checksum mismatch,
            bad zstd data, or a decompressed body over ``max_bytes``.
    """
    view = memoryview(payload).cast("B")
    total = len(view)
    if total > max_bytes:
        raise PayloadError(f"payload is {total} bytes, over the limit max_bytes={max_bytes}")
    if total < HEADER_SIZE + TRAILER_SIZE:
        raise PayloadError(
            f"truncated payload: {total} bytes, a frame needs at least {HEADER_SIZE + TRAILER_SIZE}"
        )
    magic, version, flags, reserved, body_len = HEADER.unpack(view[:HEADER_SIZE])
    if magic != MAGIC:
        raise PayloadError(f"wrong magic bytes: expected {MAGIC!r}, got {bytes(magic)!r}")
    if version != FRAME_VERSION:
        raise PayloadError(f"unsupported frame version: expected {FRAME_VERSION}, got {version}")
    if flags & ~FLAG_ZSTD:
        raise PayloadError(f"unknown frame flags: 0x{flags:02x}")
    if reserved != 0:
        raise PayloadError(f"reserved frame field must be 0, got {reserved}")
    expected_total = HEADER_SIZE + body_len + TRAILER_SIZE
    if expected_total > total:
        raise PayloadError(
            f"truncated payload: the frame declares a {body_len}-byte body "
            f"({expected_total} bytes in all), got {total} bytes"
        )
    if expected_total < total:
        raise PayloadError(
            f"{total - expected_total} unexpected bytes after the frame "
            f"(declared body {body_len} bytes, payload {total} bytes)"
        )
    end = HEADER_SIZE + body_len
    (crc,) = struct.unpack("<I", view[end:])
    actual = zlib.crc32(view[:end])
    if crc != actual:
        raise PayloadError(f"checksum mismatch: stored crc32 0x{crc:08x}, computed 0x{actual:08x}")
    body = view[HEADER_SIZE:end]
    if not flags & FLAG_ZSTD:
        return bytes(body)
    return _decompress(body, max_bytes=max_bytes)


def _decompress(body: memoryview, *, max_bytes: int) -> bytes:
    if len(body) < 4 or bytes(body[:4]) != b"\x28\xb5\x2f\xfd":
        raise PayloadError("zstd flag set but the body is not a zstd frame")
    frame_size = _zstd_frame_size(body)
    if frame_size != len(body):
        raise PayloadError(f"zstd body: {len(body) - frame_size} bytes after the zstd frame")
    try:
        size = zstandard.frame_content_size(bytes(body[:18]))
    except zstandard.ZstdError as exc:
        raise PayloadError(f"zstd body: bad frame header ({exc})") from None
    if size < 0:
        raise PayloadError("zstd body: the frame does not declare its decompressed size")
    if size > max_bytes:
        raise PayloadError(f"zstd body decompresses to {size} bytes, over the limit max_bytes={max_bytes}")
    try:
        # With a declared content size, the output buffer is exactly that size.
        out = zstandard.ZstdDecompressor().decompress(body, max_output_size=max_bytes)
    except zstandard.ZstdError as exc:
        raise PayloadError(f"zstd body: corrupt data ({exc})") from None
    if len(out) != size:
        raise PayloadError(f"zstd body: declared {size} decompressed bytes, got {len(out)}")
    return out
