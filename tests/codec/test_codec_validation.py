"""Strict decoding: every malformed payload raises PayloadError naming the problem."""

from __future__ import annotations

import copy
import json
import struct
import time
import tracemalloc

import numpy as np
import pytest
import safetensors.numpy
import torch
import zstandard
from _codec_helpers import build_payload, reframe, split_payload

import lptfl.codec.wire as wire
from lptfl.codec import DEFAULT_LIMIT, PayloadError, decode, encode
from lptfl.codec.frame import FLAG_ZSTD
from lptfl.quant.format import BFPFormat
from lptfl.quant.quantize import quantize

FMT = BFPFormat(6, layout="BC")


@pytest.fixture(scope="module")
def valid():
    gen = torch.Generator().manual_seed(0)
    state = {
        "conv.weight": quantize(torch.randn(4, 3, 3, 3, generator=gen), FMT, generator=gen),
        "bn.running_var": torch.rand(4, generator=gen) + 0.5,
        "steps": torch.tensor(3),
    }
    payload = encode(state, FMT, full_precision=["bn.running_var"])
    _, header, streams = split_payload(payload)
    return state, payload, header, streams


def _reject(payload, match, **kwargs):
    with pytest.raises(PayloadError, match=match):
        decode(payload, **kwargs)


def _with(header, streams, edit=None, **stream_edits):
    header = copy.deepcopy(header)
    if edit is not None:
        edit(header)
    streams = dict(streams, **stream_edits)
    return build_payload(header, streams)


# ----------------------------------------------------------------- the frame


def test_frame_errors(valid):
    _, payload, _, _ = valid
    _reject(b"", "truncated payload: 0 bytes")
    _reject(payload[:10], "truncated")
    _reject(payload[:-1], "truncated payload")
    _reject(payload + b"\0", "1 unexpected bytes after the frame")
    _reject(b"XXXX" + payload[4:], r"wrong magic bytes: expected b'LPTW', got b'XXXX'")
    _reject(payload[:4] + b"\x02" + payload[5:], "unsupported frame version: expected 1, got 2")
    _reject(payload[:5] + b"\x80" + payload[6:], "unknown frame flags: 0x80")
    _reject(payload[:6] + b"\x01\x00" + payload[8:], "reserved frame field")
    huge_len = payload[:8] + struct.pack("<Q", 2**63) + payload[16:]
    _reject(huge_len, "truncated payload: the frame declares")
    flipped = bytearray(payload)
    flipped[40] ^= 0x10
    _reject(bytes(flipped), "checksum mismatch")
    _reject(payload, "over the limit max_bytes=100", max_bytes=100)


def test_zstd_errors(valid):
    _, payload, header, streams = valid
    body = safetensors.numpy.save(streams, metadata={"lptfl": json.dumps(header)})
    frame = zstandard.ZstdCompressor().compress(body)
    assert decode(reframe(frame, flags=FLAG_ZSTD)).keys() == valid[0].keys()
    _reject(reframe(frame + b"junk", flags=FLAG_ZSTD), "4 bytes after the zstd frame")
    _reject(reframe(body, flags=FLAG_ZSTD), "not a zstd frame")
    _reject(reframe(frame[:-3], flags=FLAG_ZSTD), "zstd body")
    no_size = zstandard.ZstdCompressor(write_content_size=False).compress(body)
    _reject(reframe(no_size, flags=FLAG_ZSTD), "does not declare its decompressed size")
    bomb = zstandard.ZstdCompressor().compress(b"\0" * (4 << 20))
    assert len(bomb) < 2000
    _reject(reframe(bomb, flags=FLAG_ZSTD), r"decompresses to 4194304 bytes, over the limit", max_bytes=1 << 20)
    corrupt = bytearray(frame)
    corrupt[len(corrupt) // 2] ^= 0xFF
    with pytest.raises(PayloadError):
        decode(reframe(bytes(corrupt), flags=FLAG_ZSTD))


# ----------------------------------------------------------------- the safetensors body


def test_body_errors(valid):
    _, _, header, streams = valid
    _reject(reframe(b"\x01\x02"), "truncated safetensors body")
    _reject(reframe(struct.pack("<Q", 10**9) + b"{}"), "safetensors header declares 1000000000 bytes")
    _reject(reframe(struct.pack("<Q", 2) + b"{x"), "malformed safetensors header")
    _reject(reframe(struct.pack("<Q", 2) + b"[]"), "not a JSON object")
    _reject(reframe(safetensors.numpy.save(streams)), "no metadata")
    deep = "[" * 100_000 + "]" * 100_000
    _reject(reframe(struct.pack("<Q", len(deep)) + deep.encode()), "malformed safetensors header")
    text = json.dumps({"__metadata__": {"lptfl": json.dumps(header)}, "0": {"dtype": "U8", "shape": [5], "data_offsets": [0, 9]}})
    _reject(reframe(struct.pack("<Q", len(text)) + text.encode() + b"\0" * 4), "bad data offsets")
    f32 = {k: v for k, v in streams.items()}
    f32["0"] = np.zeros(3, dtype=np.float32)
    _reject(build_payload(header, f32), "dtype must be 'U8'")
    _reject(build_payload(header, dict(streams, extra=np.zeros(1, np.uint8))), r"unexpected \['extra'\]")
    _reject(build_payload(header, {k: v for k, v in streams.items() if k != "1"}), r"missing \['1'\]")
    _reject(build_payload(header, dict(streams, **{"2": np.zeros(9, np.uint8)})), "'steps': header declares 8 stream bytes, the body holds 9")


# ----------------------------------------------------------------- the lptfl header


def _set(path, value):
    def edit(h):
        target = h
        for key in path[:-1]:
            target = target[key]
        target[path[-1]] = value

    return edit


@pytest.mark.parametrize(
    ("path", "value", "match"),
    [
        (("format",), "other", "wrong format name: expected 'lptfl-wire', got 'other'"),
        (("version",), 2, "unsupported format version: expected 1, got 2"),
        (("version",), True, "unsupported format version"),
        (("extra",), 1, r"unknown fields \['extra'\]"),
        (("tensors",), {}, "'tensors' must be a list"),
        (("q", "b"), 17, r"'conv.weight': field 'b' must be an integer in \[2, 16\], got 17"),
        (("q", "b"), 1, r"field 'b' must be an integer in \[2, 16\], got 1"),
        (("q", "b"), 6.0, "field 'b' must be an integer"),
        (("q", "x"), 9, r"field 'x' must be an integer in \[1, 8\]"),
        (("q", "l"), "C", "field 'l' must be one of"),
        (("q", "sb"), "all", "field 'sb' must be one of"),
        (("q", "zz"), 1, "'q' must be an object"),
        (("tensors", 0, "d"), "F8", r"'conv.weight': field 'd' must be one of"),
        (("tensors", 0, "d"), "I32", "block-floating-point records must have dtype"),
        (("tensors", 0, "k"), "zip", r"'conv.weight': field 'k' must be one of \['bfp', 'raw'\], got 'zip'"),
        (("tensors", 0, "e0"), -129, r"field 'e0' must be an integer in \[-128, 127\], got -129"),
        (("tensors", 0, "ew"), 9, r"field 'ew' must be an integer in \[0, 8\]"),
        (("tensors", 0, "ln"), [81], "'ln' must list 2 non-negative stream lengths"),
        (("tensors", 0, "ln"), [82, 3], r"need stream lengths \[81, \d+\], header declares \[82, 3\]"),
        (("tensors", 0, "s"), [4, 3, 3, -3], "shape must be a list"),
        (("tensors", 0, "s"), [4, 3, 3, 3.0], "shape must be a list"),
        (("tensors", 0, "s"), [4, 3, 3, 2], "need stream lengths"),
        (("tensors", 0, "s"), [1] * 33, "shape must be a list of at most 32"),
        (("tensors", 0, "zz"), 0, r"'conv.weight': unknown header fields \['zz'\]"),
        (("tensors", 1, "n"), "conv.weight", r"duplicate tensor names in the header: \['conv.weight'\]"),
        (("tensors", 1, "n"), 5, "tensor #1: field 'n' must be a string"),
        (("tensors", 1, "ln"), [15], r"'bn.running_var': raw F32 data of shape \(4,\) needs 16 bytes, header declares 15"),
        (("tensors", 1, "d"), "BF16", "needs 8 bytes"),
        (("tensors", 2), [1, 2], "tensor #2: header entry must be a JSON object"),
    ],
)
def test_header_errors(valid, path, value, match):
    _, _, header, streams = valid
    _reject(_with(header, streams, _set(path, value)), match)


def test_missing_fields_and_bad_json(valid):
    _, _, header, streams = valid
    for key in ("n", "s", "d", "k", "ln", "e0", "ew"):
        h = copy.deepcopy(header)
        del h["tensors"][0][key]
        with pytest.raises(PayloadError):
            decode(build_payload(h, streams))
    h = copy.deepcopy(header)
    del h["q"]
    _reject(build_payload(h, streams), "'conv.weight': missing field 'b'")
    _reject(build_payload("{not json", streams), "malformed lptfl header")
    _reject(build_payload('{"format":"lptfl-wire","format":"x"}', streams), "duplicate JSON key")
    _reject(build_payload('{"e0": NaN}', streams), "malformed lptfl header")
    _reject(build_payload("[" * 50_000 + "]" * 50_000, streams), "malformed lptfl header")


# ----------------------------------------------------------------- the data


def test_data_errors(valid):
    _, _, header, streams = valid
    nan = np.frombuffer(np.array([1.0, np.nan, 2.0, 3.0], dtype="<f4").tobytes(), dtype=np.uint8)
    _reject(_with(header, streams, **{"1": nan}), r"'bn.running_var': raw F32 data holds NaN or infinite values")
    inf = np.frombuffer(np.array([1.0, np.inf, 2.0, 3.0], dtype="<f4").tobytes(), dtype=np.uint8)
    _reject(_with(header, streams, **{"1": inf}), "NaN or infinite")

    def as_bool(h):
        h["tensors"][2].update(d="BOOL", s=[8], ln=[8])

    _reject(_with(header, streams, as_bool, **{"2": np.array([0, 1, 2, 0, 0, 0, 0, 0], np.uint8)}), "bool data holds bytes")

    assert header["tensors"][0]["ew"] > 0

    def tiny_exp(h):
        h["tensors"][0].update(e0=127)

    _reject(_with(header, streams, tiny_exp), r"block exponent \d+ out of the 8-bit range \[-128, 127\]")


def test_padding_bits_after_mantissas_are_rejected():
    payload = encode({"w": torch.ones(3)}, BFPFormat(5))  # 15 bits: one padding bit
    _, header, streams = split_payload(payload)
    s = streams["0"].copy()
    s[1] |= 0x80
    _reject(build_payload(header, {"0": s}), "non-zero padding bits after the mantissas")
    # Three blocks with exponents 0, 1, 2: 2-bit offsets, 6 bits, 2 padding bits.
    payload = encode({"w": torch.tensor([[1.0], [2.0], [4.0]])}, BFPFormat(8, layout="B", small_block="FC"))
    _, header, streams = split_payload(payload)
    assert header["tensors"][0]["ew"] == 2 and header["tensors"][0]["ln"] == [3, 1]
    s = streams["0"].copy()
    s[-1] |= 0x40
    _reject(build_payload(header, {"0": s}), "non-zero padding bits after the exponents")


def test_fp16_overflow_is_rejected():
    # 16-bit mantissa 32767 at exponent 15 is 65534: beyond float16's largest finite value.
    header = {
        "format": "lptfl-wire",
        "version": 1,
        "q": {"b": 16, "x": 8, "l": "tensor", "sb": "FC"},
        "tensors": [{"n": "h", "s": [1], "d": "F16", "k": "bfp", "e0": 15, "ew": 0, "ln": [2, 0]}],
    }
    _reject(build_payload(header, {"0": np.array([0xFF, 0x7F], np.uint8)}), "'h': block-floating-point values overflow F16")
    ok = build_payload(header, {"0": np.array([0xF0, 0x7F], np.uint8)})  # 32752 * 2 = 65504
    assert decode(ok)["h"].item() == 65504.0


# ----------------------------------------------------------------- limits before allocation


def test_huge_declared_tensor_fails_fast_without_allocating(valid, monkeypatch):
    _, _, header, streams = valid
    calls = []
    monkeypatch.setattr(wire, "_decode_raw", lambda *a: calls.append(a))
    monkeypatch.setattr(wire, "_decode_bfp", lambda *a: calls.append(a))

    def huge(h):  # 2**40 float32 values declared, 16 bytes sent
        h["tensors"][1].update(s=[2**20, 2**20], ln=[2**42])

    payload = _with(header, streams, huge)
    tracemalloc.start()
    start = time.perf_counter()
    with pytest.raises(PayloadError, match=r"'bn.running_var': declared shape \(1048576, 1048576\) of F32 is 4398046511104 bytes, over the limit max_bytes=1073741824"):
        decode(payload)
    elapsed = time.perf_counter() - start
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert elapsed < 1.0 and peak < 1 << 20 and not calls

    def big(h):  # within the limit, but the stream is far too short
        h["tensors"][1].update(s=[2**26], ln=[2**28])

    _reject(_with(header, streams, big), "'bn.running_var': header declares 268435456 stream bytes, the body holds 16")
    assert not calls


def test_total_decoded_size_is_limited():
    fmt = BFPFormat(8)
    payload = encode({"a": torch.zeros(512, 512), "b": torch.zeros(512, 512)}, fmt)  # ~0.5 MB sent, 2 MB decoded
    assert len(payload) < 600_000
    _reject(payload, "decoded tensors would take 2097152 bytes, over the limit max_bytes=1500000", max_bytes=1_500_000)
    _reject(payload, "'a': declared shape \\(512, 512\\) of F32 is 1048576 bytes", max_bytes=1_000_000)
    assert DEFAULT_LIMIT == 1 << 30


def test_format_fields_may_sit_in_each_record(valid):
    state, payload, header, streams = valid
    h = copy.deepcopy(header)
    q = h.pop("q")
    h["tensors"][0].update(q)
    out, ref = decode(build_payload(h, streams)), decode(payload)
    assert all(torch.equal(out[n], ref[n]) for n in ref)
    h["tensors"][0]["b"] = 7  # a record's own field wins over "q"
    _reject(build_payload(dict(h, q=q), streams), r"'conv.weight': 108 7-bit mantissas")


def test_expected_formats_are_enforced(valid):
    """``formats``: each named tensor must travel in the given format (raw for None);
    the rounding is not on the wire, so it does not matter."""
    state, payload, _, _ = valid
    ok = {"conv.weight": FMT.with_rounding("stochastic"), "bn.running_var": None}
    assert decode(payload, formats=ok).keys() == state.keys()
    _reject(payload, r"tensor 'conv.weight': expected bfp8e8-BC-FC, got bfp6e8-BC-FC",
            formats={"conv.weight": BFPFormat(8, layout="BC")})
    _reject(payload, r"tensor 'conv.weight': expected bfp6e8-B-FC, got bfp6e8-BC-FC",
            formats={"conv.weight": BFPFormat(6, layout="B")})
    _reject(payload, r"tensor 'conv.weight': expected a raw \(full-precision\) record, got bfp6e8-BC-FC",
            formats={"conv.weight": None})
    _reject(payload, r"tensor 'bn.running_var': expected bfp6e8-BC-FC, got a raw record",
            formats={"bn.running_var": FMT})
    with pytest.raises(TypeError, match="BFPFormat or None"):
        decode(payload, formats={"conv.weight": "bfp6"})
    with pytest.raises(TypeError, match="BFPFormat or None"):
        decode(payload, formats=[FMT])
