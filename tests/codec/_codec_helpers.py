"""Shared helpers for the codec tests: slow reference checks and payload surgery."""

from __future__ import annotations

import json
import struct

import numpy as np
import safetensors.numpy
import torch

from lptfl.codec.frame import FLAG_ZSTD, HEADER_SIZE, wrap
from lptfl.quant.format import BFPFormat

INT_VIEW = {
    torch.float32: torch.int32,
    torch.float64: torch.int64,
    torch.bfloat16: torch.int16,
    torch.float16: torch.int16,
}


def same_bits(a: torch.Tensor, b: torch.Tensor, *, signed_zero: bool = True) -> bool:
    """Bit-for-bit equality of two tensors (same dtype and shape).

    With ``signed_zero=False``, ``-0.0`` and ``+0.0`` count as equal (the BFP records have
    no negative zero).
    """
    if a.dtype != b.dtype or a.shape != b.shape:
        return False
    if a.dtype in INT_VIEW:
        if not signed_zero:
            a, b = a + 0.0, b + 0.0  # -0.0 + 0.0 == +0.0
        return torch.equal(a.view(INT_VIEW[a.dtype]), b.view(INT_VIEW[b.dtype]))
    return torch.equal(a, b)


def blocks_of(x: np.ndarray, fmt: BFPFormat) -> np.ndarray:
    """The values of ``x`` as a (num_blocks, block_size) array, by the layout rules."""
    layout = fmt.block_layout(x.ndim)
    lead = {"tensor": 0, "B": 1, "BC": 2}[layout]
    nblocks = int(np.prod(x.shape[:lead], dtype=np.int64)) if lead else 1
    return x.reshape(nblocks, -1)


def on_grid_reference(x: torch.Tensor, fmt: BFPFormat) -> bool:
    """Slow reference: is every block ``m * 2**(e - (bits-2))`` for some in-range e and m?"""
    v = x.to(torch.float64).numpy()
    if v.size == 0:
        return True
    exps = np.arange(fmt.exp_min, fmt.exp_max + 1)
    scales = np.ldexp(1.0, exps - (fmt.bits - 2))[:, None]
    for block in blocks_of(v, fmt):
        q = block[None, :] / scales  # exact: dividing by a power of two in float64
        ok = np.all((q == np.round(q)) & (q >= fmt.mantissa_min) & (q <= fmt.mantissa_max), axis=1)
        if not ok.any():
            return False
    return True


def split_payload(payload: bytes) -> tuple[int, dict, dict[str, np.ndarray]]:
    """(frame flags, lptfl header dict, streams) of a valid payload."""
    import zstandard

    flags = payload[5]
    (body_len,) = struct.unpack("<Q", payload[8:16])
    body = payload[HEADER_SIZE : HEADER_SIZE + body_len]
    if flags & FLAG_ZSTD:
        body = zstandard.ZstdDecompressor().decompress(body)
    (n,) = struct.unpack("<Q", body[:8])
    meta = json.loads(body[8 : 8 + n])["__metadata__"]
    return flags, json.loads(meta["lptfl"]), safetensors.numpy.load(body)


def build_payload(header: dict | str, streams: dict[str, np.ndarray], *, compress: bool = False) -> bytes:
    """A correctly framed payload (valid checksum) around any header and streams."""
    text = header if isinstance(header, str) else json.dumps(header, separators=(",", ":"))
    body = safetensors.numpy.save(streams, metadata={"lptfl": text})
    return wrap(body, compress=compress)


def reframe(body: bytes, *, flags: int = 0) -> bytes:
    """Frame raw ``body`` bytes with a valid checksum (no compression applied)."""
    import zlib

    head = struct.pack("<4sBBHQ", b"LPTW", 1, flags, 0, len(body))
    return head + body + struct.pack("<I", zlib.crc32(head + body))


def random_state(gen: torch.Generator) -> dict[str, torch.Tensor]:
    """A small mixed state dict: conv/linear weights, a bias, BN stats and a counter."""
    return {
        "conv.weight": torch.randn(4, 3, 3, 3, generator=gen) * 0.1,
        "conv.bias": torch.randn(4, generator=gen) * 0.01,
        "bn.running_mean": torch.randn(4, generator=gen),
        "bn.running_var": torch.rand(4, generator=gen) + 0.5,
        "bn.num_batches_tracked": torch.tensor(7, dtype=torch.int64),
        "fc.weight": (torch.randn(3, 8, generator=gen) * 0.2).to(torch.bfloat16),
    }
