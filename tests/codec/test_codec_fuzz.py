"""Fuzzing: any bytes give either a valid decode or a PayloadError, never another exception.

Mutations are applied at three depths: to the raw payload (the checksum catches them), to
the frame body with the checksum recomputed (reaching the safetensors and zstd parsers), and
to the lptfl JSON header with a valid container around it (reaching the field validators).
"""

from __future__ import annotations

import copy
import json
import struct

import pytest
import torch
from _codec_helpers import build_payload, reframe, split_payload
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from lptfl.codec import PayloadError, decode, encode
from lptfl.codec.frame import HEADER_SIZE
from lptfl.quant.format import BFPFormat
from lptfl.quant.quantize import quantize

FUZZ = settings(max_examples=150, deadline=None, suppress_health_check=list(HealthCheck))
LIMIT = 1 << 22  # keep any accidental allocation small


def _payloads() -> list[bytes]:
    gen = torch.Generator().manual_seed(0)
    fmt = BFPFormat(5, layout="BC")
    state = {
        "c": quantize(torch.randn(3, 2, 3, 3, generator=gen), fmt, generator=gen),
        "b": torch.randn(3, generator=gen).to(torch.float16),
        "v": torch.rand(3, generator=gen),
        "n": torch.tensor(4),
        "m": torch.tensor([True, False]),
    }
    return [
        encode(state, fmt, full_precision=["v"]),
        encode(state, fmt, full_precision=["v"], compress=True),
        encode(state, None),
        encode(state, BFPFormat(16, exp_bits=3, layout="B")),
        encode({}, None),
    ]


PAYLOADS = _payloads()


def _check(data: bytes) -> None:
    try:
        out = decode(data, max_bytes=LIMIT)
    except PayloadError as exc:
        # The catch-all in decode() turns internal errors into PayloadError; the fuzzer must
        # never reach it: every problem should be caught by an explicit check.
        assert not str(exc).startswith("malformed payload (unexpected"), str(exc)
        return
    assert isinstance(out, dict)
    for t in out.values():
        assert isinstance(t, torch.Tensor)
        if t.is_floating_point():
            assert bool(torch.isfinite(t).all())


mutation = st.one_of(
    st.tuples(st.just("flip"), st.integers(0, 10**6), st.integers(0, 7)),
    st.tuples(st.just("truncate"), st.integers(0, 10**6)),
    st.tuples(st.just("extend"), st.binary(min_size=1, max_size=16)),
    st.tuples(st.just("splice"), st.integers(0, 10**6), st.integers(0, 40), st.binary(max_size=40)),
    st.tuples(st.just("set_u64"), st.integers(0, 10**6), st.integers(0, 2**64 - 1)),
)


def _mutate(data: bytes, ops) -> bytes:
    buf = bytearray(data)
    for op in ops:
        n = max(len(buf), 1)
        if op[0] == "flip" and buf:
            buf[op[1] % n] ^= 1 << op[2]
        elif op[0] == "truncate":
            del buf[op[1] % n :]
        elif op[0] == "extend":
            buf += op[1]
        elif op[0] == "splice":
            i = op[1] % n
            buf[i : i + op[2]] = op[3]
        elif op[0] == "set_u64" and len(buf) >= 8:
            i = op[1] % (len(buf) - 7)
            buf[i : i + 8] = struct.pack("<Q", op[2])
    return bytes(buf)


@FUZZ
@given(st.binary(max_size=400))
def test_random_bytes(data):
    _check(data)
    _check(b"LPTW\x01\x00\x00\x00" + data)


@FUZZ
@given(st.sampled_from(range(len(PAYLOADS))), st.lists(mutation, min_size=1, max_size=3))
def test_mutated_payloads(which, ops):
    payload = PAYLOADS[which]
    mutated = _mutate(payload, ops)
    if mutated == payload:
        assert decode(mutated).keys() == decode(payload).keys()
        return
    with pytest.raises(PayloadError):
        decode(mutated, max_bytes=LIMIT)  # the checksum (or the frame) catches every change


@FUZZ
@given(st.sampled_from(range(len(PAYLOADS))), st.lists(mutation, min_size=1, max_size=3))
def test_mutated_bodies_with_valid_checksum(which, ops):
    payload = PAYLOADS[which]
    (body_len,) = struct.unpack("<Q", payload[8:16])
    body = payload[HEADER_SIZE : HEADER_SIZE + body_len]
    _check(reframe(_mutate(body, ops), flags=payload[5]))


json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.floats(allow_nan=False) | st.text(max_size=6),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=3), children, max_size=4),
    max_leaves=8,
)


@FUZZ
@given(
    st.sampled_from([0, 2, 3]),
    st.lists(st.tuples(st.integers(0, 10**6), st.sampled_from(["n", "s", "d", "k", "ln", "e0", "ew", "b", "x", "l", "sb", "?"]), json_values), min_size=1, max_size=3),
    st.sampled_from(["none", "q", "top"]),
    json_values,
)
def test_mutated_headers_with_valid_container(which, edits, where, value):
    _, header, streams = split_payload(PAYLOADS[which])
    header = copy.deepcopy(header)
    for index, key, new in edits:
        if header["tensors"]:
            header["tensors"][index % len(header["tensors"])][key] = new
    if where == "q":
        header["q"] = value
    elif where == "top":
        header["tensors"] = value
    _check(build_payload(header, streams))


@FUZZ
@given(st.sampled_from(range(len(PAYLOADS))), st.integers(0, 10**6), st.text(max_size=4))
def test_mutated_header_text(which, pos, text):
    _, header, streams = split_payload(PAYLOADS[which])
    raw = json.dumps(header, separators=(",", ":"))
    i = pos % (len(raw) + 1)
    _check(build_payload(raw[:i] + text + raw[i + len(text) :], streams))
