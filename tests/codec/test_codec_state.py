"""Whole state dicts: raw records, fmt=None, compression, expect, encode errors, sizes."""

from __future__ import annotations

import json
import zlib

import pytest
import torch
from _codec_helpers import random_state, same_bits, split_payload

from lptfl.codec import FORMAT_NAME, FORMAT_VERSION, PayloadError, decode, encode
from lptfl.quant.format import BFPFormat
from lptfl.quant.quantize import quantize

BN_STATS = ("bn.running_mean", "bn.running_var")


def _spec(state):
    return {n: (tuple(t.shape), t.dtype) for n, t in state.items()}


def test_full_precision_and_integer_buffers_are_exact():
    gen = torch.Generator().manual_seed(0)
    state = random_state(gen)
    state["flags"] = torch.tensor([True, False, True])
    state["codes"] = torch.tensor([[-128, 0, 127]], dtype=torch.int8)
    state["u8"] = torch.arange(256, dtype=torch.uint8)
    state["i16"] = torch.tensor([-(2**15), 2**15 - 1], dtype=torch.int16)
    state["i32"] = torch.tensor([-(2**31), 2**31 - 1], dtype=torch.int32)
    state["big"] = torch.tensor([-(2**63), 2**63 - 1], dtype=torch.int64)
    state["f64"] = torch.randn(3, dtype=torch.float64, generator=gen)
    state["negzero"] = torch.tensor([-0.0, 1.0])
    fmt = BFPFormat(4, layout="BC")
    out = decode(encode(state, fmt, full_precision=BN_STATS + ("negzero",)), expect=_spec(state))
    assert list(out) == list(state)
    for name in BN_STATS + ("bn.num_batches_tracked", "flags", "codes", "u8", "i16", "i32", "big", "f64", "negzero"):
        assert same_bits(out[name], state[name]), name
    # The float weights were quantized (off grid), the dtypes are kept.
    assert out["fc.weight"].dtype == torch.bfloat16
    assert same_bits(out["conv.weight"], quantize(state["conv.weight"], fmt.with_rounding("nearest")), signed_zero=False)


def test_fmt_none_is_exact_raw_everywhere():
    state = random_state(torch.Generator().manual_seed(1))
    state["half"] = torch.randn(5, 5).half()
    payload = encode(state, None)
    out = decode(payload, expect=_spec(state))
    for name, t in state.items():
        assert same_bits(out[name], t), name
    _, header, _ = split_payload(payload)
    assert {r["k"] for r in header["tensors"]} == {"raw"} and "q" not in header
    n = sum(t.numel() * t.element_size() for t in state.values())
    assert n < len(payload) < n + 1500  # raw bytes plus a small header


def test_header_fields():
    state = {"w": quantize(torch.randn(4, 3, 3, 3), BFPFormat(6)), "b": torch.zeros(4)}
    _, header, streams = split_payload(encode(state, BFPFormat(6, layout="BC")))
    assert header["format"] == FORMAT_NAME and header["version"] == FORMAT_VERSION
    assert header["q"] == {"b": 6, "x": 8, "l": "BC", "sb": "FC"}
    w, b = header["tensors"]
    assert w["n"] == "w" and w["s"] == [4, 3, 3, 3] and w["d"] == "F32" and w["k"] == "bfp"
    assert w["ln"] == [(108 * 6 + 7) // 8, (12 * w["ew"] + 7) // 8]
    assert b["ew"] == 0 and b["ln"] == [3, 0]  # an all-zero tensor: 4 zero mantissas, no exponent bits
    assert streams["0"].size == sum(w["ln"]) and streams["1"].size == 3


@pytest.mark.parametrize("fmt", [None, BFPFormat(8, layout="B")])
def test_compression_is_lossless(fmt):
    state = random_state(torch.Generator().manual_seed(2))
    state["zeros"] = torch.zeros(64, 64)
    plain, packed = encode(state, fmt), encode(state, fmt, compress=True)
    assert len(packed) < len(plain)
    a, b = decode(plain), decode(packed)
    for name in state:
        assert same_bits(a[name], b[name]), name


def test_empty_state_and_order():
    assert decode(encode({}, BFPFormat(8))) == {}
    state = {"z": torch.ones(2), "a": torch.ones(3), "m": torch.ones(())}
    assert list(decode(encode(state, BFPFormat(8)))) == ["z", "a", "m"]


def test_payload_is_independent_of_device_layout_and_grad():
    x = torch.randn(6, 4, requires_grad=True)
    fmt = BFPFormat(8)
    assert encode({"w": x}, fmt) == encode({"w": x.detach().t().contiguous().t()}, fmt)


def test_expect_mismatches_are_reported_by_name():
    state = random_state(torch.Generator().manual_seed(3))
    payload = encode(state, BFPFormat(8), full_precision=BN_STATS)
    spec = _spec(state)
    decode(payload, expect=spec)
    missing = dict(spec, extra=((1,), torch.float32))
    with pytest.raises(PayloadError, match=r"missing \['extra'\]"):
        decode(payload, expect=missing)
    fewer = {k: v for k, v in spec.items() if k != "conv.bias"}
    with pytest.raises(PayloadError, match=r"unexpected \['conv.bias'\]"):
        decode(payload, expect=fewer)
    with pytest.raises(PayloadError, match=r"'conv.weight': expected shape \(4, 3, 3, 1\), got \(4, 3, 3, 3\)"):
        decode(payload, expect=dict(spec, **{"conv.weight": ((4, 3, 3, 1), torch.float32)}))
    with pytest.raises(PayloadError, match=r"'fc.weight': expected dtype torch.float32, got torch.bfloat16"):
        decode(payload, expect=dict(spec, **{"fc.weight": ((3, 8), torch.float32)}))
    with pytest.raises(TypeError):
        decode(payload, expect={"conv.weight": "nonsense"})


def test_encode_rejects_bad_input():
    fmt = BFPFormat(8)
    with pytest.raises(ValueError, match="'w'.*NaN"):
        encode({"w": torch.tensor([1.0, float("nan")])}, fmt)
    with pytest.raises(ValueError, match="'w'.*NaN or infinite"):
        encode({"w": torch.tensor([float("inf")])}, None)
    with pytest.raises(ValueError, match="not in the state"):
        encode({"w": torch.ones(1)}, fmt, full_precision=["v"])
    with pytest.raises(TypeError):
        encode({"w": torch.ones(1, dtype=torch.complex64)}, fmt)
    with pytest.raises(TypeError):
        encode({1: torch.ones(1)}, fmt)
    with pytest.raises(TypeError):
        encode({"w": [1.0]}, fmt)
    with pytest.raises(TypeError):
        encode({"w": torch.ones(1)}, "bfp8")
    with pytest.raises(TypeError, match=r"state must be a mapping name -> tensor \(e.g. model.state_dict\(\)\), got Linear"):
        encode(torch.nn.Linear(2, 2), fmt)
    with pytest.raises(TypeError, match="full_precision must be names of state entries, got NoneType"):
        encode({"w": torch.ones(1)}, fmt, full_precision=None)
    with pytest.raises(TypeError, match="tensor 'w': a meta tensor holds no values"):
        encode({"w": torch.empty(2, device="meta")}, fmt)
    with pytest.raises(TypeError, match="generator must be a torch.Generator"):
        encode({"w": torch.ones(2)}, fmt, generator=0)


def test_decoder_rejects_non_bytes_and_bad_limits():
    with pytest.raises(TypeError):
        decode("LPTW")
    with pytest.raises(ValueError):
        decode(b"", max_bytes=0)


def test_json_header_is_compact():
    state = {f"layer{i}.weight": torch.randn(8, 8, 3, 3) for i in range(10)}
    _, header, _ = split_payload(encode(state, BFPFormat(8, layout="BC")))
    per_tensor = len(json.dumps(header["tensors"], separators=(",", ":"))) / len(state)
    assert per_tensor < 100


def test_worked_example_of_the_docs():
    """The example in docs/wire-format.md, byte for byte (streams, header, frame)."""
    state = {"w": torch.tensor([1.0, -0.5, 0.25]), "v": torch.tensor([[3.0, 0.5], [-0.75, 0.0], [0.0, 0.0]])}
    payload = encode(state, BFPFormat(4, layout="B"))
    flags, header, streams = split_payload(payload)
    assert flags == 0
    assert json.dumps(header, separators=(",", ":")) == (
        '{"format":"lptfl-wire","version":1,"q":{"b":4,"x":8,"l":"B","sb":"FC"},"tensors":['
        '{"n":"w","s":[3],"d":"F32","k":"bfp","e0":0,"ew":0,"ln":[2,0]},'
        '{"n":"v","s":[3,2],"d":"F32","k":"bfp","e0":-1,"ew":2,"ln":[3,1]}]}'
    )
    assert streams["0"].tobytes().hex() == "e401" and streams["1"].tobytes().hex() == "160a0002"
    assert payload[:16].hex() == "4c50545701000000" + (len(payload) - 20).to_bytes(8, "little").hex()
    assert zlib.crc32(payload[:-4]).to_bytes(4, "little") == payload[-4:]
    out = decode(bytearray(payload))
    assert same_bits(out["v"], state["v"]) and same_bits(decode(memoryview(payload))["w"], state["w"])
