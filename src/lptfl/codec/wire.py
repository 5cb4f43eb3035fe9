"""``encode`` / ``decode``: a state dict <-> an lptfl-wire payload (``docs/wire-format.md``).

The body is a safetensors file whose tensors are uint8 byte streams, one per model tensor
(keyed ``"0"``, ``"1"``, ... in record order), with a JSON header in its metadata under the
key ``"lptfl"``. Block-floating-point records hold bit-packed two's-complement mantissas
followed by bit-packed block-exponent offsets; raw records hold the tensor's bytes.
"""

from __future__ import annotations

import json
import math
import struct
import sys
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

import numpy as np
import safetensors.numpy
import torch

from lptfl.codec import bfp, bitpack
from lptfl.codec.errors import PayloadError
from lptfl.codec.frame import unwrap, wrap
from lptfl.quant.format import LAYOUTS, SMALL_BLOCKS, BFPFormat
from lptfl.quant.random import check_generator

FORMAT_NAME = "lptfl-wire"
FORMAT_VERSION = 1
METADATA_KEY = "lptfl"
DEFAULT_LIMIT = 1 << 30
"""Default ``max_bytes`` of :func:`decode`: 1 GiB (payload, decompressed body, decoded tensors)."""

MAX_NDIM = 32

# Wire dtype names (those of safetensors) <-> torch dtypes.
DTYPES: dict[str, torch.dtype] = {
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "F64": torch.float64,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}
DTYPE_NAMES = {v: k for k, v in DTYPES.items()}
BFP_DTYPES = ("F32", "F16", "BF16")
FLOAT_DTYPES = ("F32", "F16", "BF16", "F64")


# --------------------------------------------------------------------------- encoding


def _raw_bytes(t: torch.Tensor) -> np.ndarray:
    flat = t.reshape(-1)
    if t.dtype == torch.bool:
        flat = flat.to(torch.uint8)
    data = flat.view(torch.uint8)
    if sys.byteorder == "big" and t.element_size() > 1:
        data = data.reshape(-1, t.element_size()).flip(-1).reshape(-1)
    return data.numpy()


def _encode_tensor(
    name: str,
    t: torch.Tensor,
    fmt: BFPFormat | None,
    raw: bool,
    generator: torch.Generator | None,
) -> tuple[dict, np.ndarray]:
    if t.dtype not in DTYPE_NAMES:
        raise TypeError(f"tensor {name!r}: dtype {t.dtype} is not supported on the wire")
    if t.layout != torch.strided:
        raise TypeError(f"tensor {name!r}: only dense (strided) tensors are supported, got {t.layout}")
    if t.is_meta:
        raise TypeError(f"tensor {name!r}: a meta tensor holds no values to send (materialise the model first)")
    t = t.detach().to("cpu").contiguous()
    dname = DTYPE_NAMES[t.dtype]
    record: dict = {"n": name, "s": list(t.shape), "d": dname}
    if raw or fmt is None or dname not in BFP_DTYPES:
        if dname in FLOAT_DTYPES and not bool(torch.isfinite(t).all()):
            raise ValueError(f"tensor {name!r} holds NaN or infinite values; the wire carries finite floats only")
        stream = _raw_bytes(t)
        record.update(k="raw", ln=[int(stream.size)])
        return record, stream
    try:
        mantissas, exps = bfp.split(t, fmt, generator=generator)
    except ValueError as exc:
        raise ValueError(f"tensor {name!r}: {exc}") from None
    if bfp.may_overflow(exps, t.dtype) and not bool(torch.isfinite(bfp.join(mantissas, exps, fmt, t.dtype)).all()):
        raise ValueError(
            f"tensor {name!r}: its {fmt.bits}-bit block-floating-point values overflow {t.dtype}"
        )
    mant = bitpack.pack(bitpack.to_unsigned(mantissas.reshape(-1).numpy(), fmt.bits), fmt.bits)
    e = exps.reshape(-1).numpy().astype(np.int64)
    if e.size:
        e_min = int(e.min())
        width = int(e.max() - e_min).bit_length()
    else:
        e_min, width = fmt.exp_min, 0
    ex = bitpack.pack(e - e_min, width)
    record.update(
        k="bfp",
        e0=e_min,
        ew=width,
        ln=[int(mant.size), int(ex.size)],
    )
    return record, np.concatenate([mant, ex])


def encode(
    state: Mapping[str, torch.Tensor],
    fmt: BFPFormat | None,
    *,
    full_precision: Iterable[str] = (),
    compress: bool = False,
    generator: torch.Generator | None = None,
) -> bytes:
    """Serialise a state dict into an lptfl-wire payload.

    Args:
        state: tensor name -> tensor (any device; order is kept).
        fmt: block-floating-point format for float32/bfloat16/float16 tensors, or ``None``
            to send every tensor as a raw record in its own dtype (the full-precision
            baseline).
        full_precision: names of float tensors to send raw (exactly), e.g. batch-norm
            running statistics. Integer, bool and float64 tensors are always sent raw.
        compress: zstd-compress the body (lossless; off by default).
        generator: with ``fmt.rounding == "stochastic"``, a (CPU) generator that seeds the
            stochastic rounding of off-grid tensors, exactly as
            ``quantize(x, fmt, generator=generator)``. Without it, off-grid tensors are
            rounded to nearest (the server's downlink ``Q(wbar)``).

    A tensor already on ``fmt``'s grid is stored exactly (``decode`` gives it back bit for
    bit, except that ``-0.0`` comes back as ``+0.0``, which ``quantize`` never outputs) and
    draws no randomness; any other tensor is first quantized as a whole.

    Returns:
        The payload; its ``len`` is the number of bytes on the wire.

    Raises:
        TypeError: ``state`` is not a mapping, a name is not a string, a value not a dense tensor
            with data, its dtype unsupported, or ``generator`` not a torch.Generator.
        ValueError: unknown ``full_precision`` names, or NaN/infinite values.
    """
    if not isinstance(state, Mapping):
        raise TypeError(f"state must be a mapping name -> tensor (e.g. model.state_dict()), got {type(state).__name__}")
    if fmt is not None and not isinstance(fmt, BFPFormat):
        raise TypeError(f"fmt must be a BFPFormat or None, got {type(fmt).__name__}")
    check_generator(generator)
    if not isinstance(full_precision, Iterable):
        raise TypeError(f"full_precision must be names of state entries, got {type(full_precision).__name__}")
    if isinstance(full_precision, str):
        full_precision = (full_precision,)
    keep = set(full_precision)
    unknown = sorted(str(n) for n in keep if n not in state)
    if unknown:
        raise ValueError(f"full_precision names tensors that are not in the state: {unknown}")
    records = []
    streams: dict[str, np.ndarray] = {}
    for i, (name, t) in enumerate(state.items()):
        if not isinstance(name, str):
            raise TypeError(f"state keys must be strings, got {type(name).__name__}")
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"state[{name!r}] must be a torch.Tensor, got {type(t).__name__}")
        record, stream = _encode_tensor(name, t, fmt, name in keep, generator)
        records.append(record)
        streams[str(i)] = np.ascontiguousarray(stream, dtype=np.uint8)
    header: dict = {"format": FORMAT_NAME, "version": FORMAT_VERSION}
    if fmt is not None and any(r["k"] == "bfp" for r in records):
        header["q"] = {"b": fmt.bits, "x": fmt.exp_bits, "l": fmt.layout, "sb": fmt.small_block}
    header["tensors"] = records
    text = json.dumps(header, separators=(",", ":"))
    body = safetensors.numpy.save(streams, metadata={METADATA_KEY: text})
    return wrap(body, compress=compress)


# --------------------------------------------------------------------------- decoding


@dataclass
class _Record:
    key: str
    name: str
    shape: tuple[int, ...]
    dtype: str
    kind: str
    lengths: tuple[int, ...]
    numel: int
    fmt: BFPFormat | None = None
    e_min: int = 0
    e_width: int = 0
    n_exp: int = 0


def _no_duplicates(pairs):
    out = {}
    for k, v in pairs:
        if k in out:
            raise ValueError(f"duplicate JSON key {k!r}")
        out[k] = v
    return out


def _parse_json(text: str | bytes, what: str):
    try:
        if isinstance(text, (bytes, bytearray)):
            text = bytes(text).decode("utf-8")
        return json.loads(text, object_pairs_hook=_no_duplicates, parse_constant=_reject_constant)
    except (ValueError, RecursionError) as exc:
        raise PayloadError(f"malformed {what}: {exc}") from None


def _reject_constant(name: str):
    raise ValueError(f"non-standard JSON constant {name}")


def _is_int(v) -> bool:
    return type(v) is int


def _int_field(rec: Mapping, key: str, where: str, lo: int, hi: int) -> int:
    if key not in rec:
        raise PayloadError(f"{where}: missing field {key!r}")
    v = rec[key]
    if not _is_int(v) or not lo <= v <= hi:
        raise PayloadError(f"{where}: field {key!r} must be an integer in [{lo}, {hi}], got {v!r}")
    return v


def _str_field(rec: Mapping, key: str, where: str, allowed: Iterable[str] | None = None) -> str:
    if key not in rec:
        raise PayloadError(f"{where}: missing field {key!r}")
    v = rec[key]
    if not isinstance(v, str):
        raise PayloadError(f"{where}: field {key!r} must be a string, got {v!r}")
    if allowed is not None and v not in allowed:
        raise PayloadError(f"{where}: field {key!r} must be one of {sorted(allowed)}, got {v!r}")
    return v


_RAW_KEYS = {"n", "s", "d", "k", "ln"}
_FMT_KEYS = {"b", "x", "l", "sb"}
_BFP_KEYS = _RAW_KEYS | _FMT_KEYS | {"e0", "ew"}


def _parse_record(i: int, rec, max_bytes: int, defaults: Mapping) -> _Record:
    where = f"tensor #{i}"
    if not isinstance(rec, dict):
        raise PayloadError(f"{where}: header entry must be a JSON object, got {type(rec).__name__}")
    name = _str_field(rec, "n", where)
    where = f"tensor {name!r}"
    shape = rec.get("s")
    if (
        not isinstance(shape, list)
        or len(shape) > MAX_NDIM
        or not all(_is_int(d) and 0 <= d <= max_bytes for d in shape)
    ):
        raise PayloadError(f"{where}: shape must be a list of at most {MAX_NDIM} non-negative integers, got {shape!r}")
    dtype = _str_field(rec, "d", where, DTYPES)
    kind = _str_field(rec, "k", where, ("bfp", "raw"))
    extra = set(rec) - (_BFP_KEYS if kind == "bfp" else _RAW_KEYS)
    if extra:
        raise PayloadError(f"{where}: unknown header fields {sorted(extra)}")
    lengths = rec.get("ln")
    n_streams = 2 if kind == "bfp" else 1
    if not isinstance(lengths, list) or len(lengths) != n_streams or not all(
        _is_int(v) and v >= 0 for v in lengths
    ):
        raise PayloadError(f"{where}: 'ln' must list {n_streams} non-negative stream lengths, got {lengths!r}")
    numel = math.prod(shape)
    itemsize = DTYPES[dtype].itemsize
    if numel * itemsize > max_bytes:
        raise PayloadError(
            f"{where}: declared shape {tuple(shape)} of {dtype} is {numel * itemsize} bytes, "
            f"over the limit max_bytes={max_bytes}"
        )
    record = _Record(str(i), name, tuple(shape), dtype, kind, tuple(lengths), numel)
    if kind == "raw":
        if lengths[0] != numel * itemsize:
            raise PayloadError(
                f"{where}: raw {dtype} data of shape {tuple(shape)} needs {numel * itemsize} bytes, "
                f"header declares {lengths[0]}"
            )
        return record
    if dtype not in BFP_DTYPES:
        raise PayloadError(f"{where}: block-floating-point records must have dtype in {BFP_DTYPES}, got {dtype!r}")
    spec = {**defaults, **{k: v for k, v in rec.items() if k in _FMT_KEYS}}
    bits = _int_field(spec, "b", where, 2, 16)
    exp_bits = _int_field(spec, "x", where, 1, 8)
    layout = _str_field(spec, "l", where, LAYOUTS)
    small_block = _str_field(spec, "sb", where, SMALL_BLOCKS)
    fmt = BFPFormat(bits, exp_bits=exp_bits, layout=layout, small_block=small_block, rounding="nearest")
    e_min = _int_field(rec, "e0", where, fmt.exp_min, fmt.exp_max)
    e_width = _int_field(rec, "ew", where, 0, 8)
    n_exp = bfp.num_exponents(record.shape, fmt)
    want = (bitpack.packed_size(numel, bits), bitpack.packed_size(n_exp, e_width))
    if tuple(lengths) != want:
        raise PayloadError(
            f"{where}: {numel} {bits}-bit mantissas and {n_exp} {e_width}-bit exponents need "
            f"stream lengths {list(want)}, header declares {lengths}"
        )
    record.fmt, record.e_min, record.e_width, record.n_exp = fmt, e_min, e_width, n_exp
    return record


def _parse_safetensors_header(body: bytes) -> tuple[dict, dict[str, int]]:
    """The metadata dict and ``{stream key: byte length}`` from a safetensors body."""
    if len(body) < 8:
        raise PayloadError(f"truncated safetensors body: {len(body)} bytes")
    (n,) = struct.unpack("<Q", body[:8])
    if n > len(body) - 8:
        raise PayloadError(f"safetensors header declares {n} bytes, only {len(body) - 8} present")
    head = _parse_json(body[8 : 8 + n], "safetensors header")
    if not isinstance(head, dict):
        raise PayloadError("malformed safetensors header: not a JSON object")
    meta = head.pop("__metadata__", None)
    if not isinstance(meta, dict):
        raise PayloadError("safetensors body has no metadata; not an lptfl-wire payload")
    data_size = len(body) - 8 - n
    sizes: dict[str, int] = {}
    for key, entry in head.items():
        if not isinstance(entry, dict):
            raise PayloadError(f"safetensors entry {key!r}: not a JSON object")
        offsets, shape = entry.get("data_offsets"), entry.get("shape")
        if entry.get("dtype") != "U8":
            raise PayloadError(f"safetensors entry {key!r}: dtype must be 'U8', got {entry.get('dtype')!r}")
        if (
            not isinstance(offsets, list)
            or len(offsets) != 2
            or not all(_is_int(v) for v in offsets)
            or not 0 <= offsets[0] <= offsets[1] <= data_size
        ):
            raise PayloadError(f"safetensors entry {key!r}: bad data offsets {offsets!r} (data is {data_size} bytes)")
        if shape != [offsets[1] - offsets[0]]:
            raise PayloadError(f"safetensors entry {key!r}: shape {shape!r} does not match offsets {offsets}")
        sizes[key] = offsets[1] - offsets[0]
    return meta, sizes


def _check_expect(records: list[_Record], expect: Mapping[str, tuple[tuple[int, ...], torch.dtype]]) -> None:
    got = {r.name: r for r in records}
    missing = [n for n in expect if n not in got]
    extra = [r.name for r in records if r.name not in expect]
    if missing or extra:
        raise PayloadError(f"tensor names differ from the expected model: missing {missing}, unexpected {extra}")
    for name, (shape, dtype) in expect.items():
        r = got[name]
        if r.shape != shape:
            raise PayloadError(f"tensor {name!r}: expected shape {shape}, got {r.shape}")
        if DTYPES[r.dtype] != dtype:
            raise PayloadError(f"tensor {name!r}: expected dtype {dtype}, got {DTYPES[r.dtype]}")


def _parse_header(meta: dict, sizes: dict[str, int], max_bytes: int) -> list[_Record]:
    if set(meta) != {METADATA_KEY}:
        raise PayloadError(f"safetensors metadata must hold exactly the key {METADATA_KEY!r}, got {sorted(meta)}")
    text = meta[METADATA_KEY]
    if not isinstance(text, str):
        raise PayloadError("lptfl header must be a JSON string")
    header = _parse_json(text, "lptfl header")
    if not isinstance(header, dict):
        raise PayloadError("malformed lptfl header: not a JSON object")
    if header.get("format") != FORMAT_NAME:
        raise PayloadError(f"wrong format name: expected {FORMAT_NAME!r}, got {header.get('format')!r}")
    if header.get("version") != FORMAT_VERSION or not _is_int(header.get("version")):
        raise PayloadError(f"unsupported format version: expected {FORMAT_VERSION}, got {header.get('version')!r}")
    unknown = set(header) - {"format", "version", "q", "tensors"}
    if unknown:
        raise PayloadError(f"lptfl header: unknown fields {sorted(unknown)}")
    entries = header.get("tensors")
    if not isinstance(entries, list):
        raise PayloadError("lptfl header: 'tensors' must be a list")
    defaults = header.get("q", {})
    if not isinstance(defaults, dict) or set(defaults) - _FMT_KEYS:
        raise PayloadError(f"lptfl header: 'q' must be an object with keys among {sorted(_FMT_KEYS)}, got {defaults!r}")
    records = [_parse_record(i, rec, max_bytes, defaults) for i, rec in enumerate(entries)]
    names = [r.name for r in records]
    if len(set(names)) != len(names):
        dup = sorted({n for n in names if names.count(n) > 1})
        raise PayloadError(f"duplicate tensor names in the header: {dup}")
    keys = {r.key for r in records}
    if set(sizes) != keys:
        raise PayloadError(
            f"stream keys do not match the header: missing {sorted(keys - set(sizes))}, "
            f"unexpected {sorted(set(sizes) - keys)}"
        )
    total = 0
    for r in records:
        if sizes[r.key] != sum(r.lengths):
            raise PayloadError(
                f"tensor {r.name!r}: header declares {sum(r.lengths)} stream bytes, the body holds {sizes[r.key]}"
            )
        total += r.numel * DTYPES[r.dtype].itemsize
    if total > max_bytes:
        raise PayloadError(f"decoded tensors would take {total} bytes, over the limit max_bytes={max_bytes}")
    return records


def _decode_raw(r: _Record, stream: np.ndarray) -> torch.Tensor:
    dtype = DTYPES[r.dtype]
    data = torch.from_numpy(np.array(stream, dtype=np.uint8, copy=True))
    if dtype == torch.bool:
        if bool((data > 1).any()):
            raise PayloadError(f"tensor {r.name!r}: bool data holds bytes other than 0 and 1")
        return data.to(torch.bool).reshape(r.shape)
    if sys.byteorder == "big" and dtype.itemsize > 1:
        data = data.reshape(-1, dtype.itemsize).flip(-1).reshape(-1).contiguous()
    t = data.view(dtype).reshape(r.shape)
    if r.dtype in FLOAT_DTYPES and not bool(torch.isfinite(t).all()):
        raise PayloadError(f"tensor {r.name!r}: raw {r.dtype} data holds NaN or infinite values")
    return t


def _decode_bfp(r: _Record, stream: np.ndarray) -> torch.Tensor:
    fmt = r.fmt
    assert fmt is not None
    n_mant = r.lengths[0]
    mant_stream, exp_stream = stream[:n_mant], stream[n_mant:]
    if not bitpack.padding_is_zero(mant_stream, r.numel, fmt.bits):
        raise PayloadError(f"tensor {r.name!r}: non-zero padding bits after the mantissas")
    if not bitpack.padding_is_zero(exp_stream, r.n_exp, r.e_width):
        raise PayloadError(f"tensor {r.name!r}: non-zero padding bits after the exponents")
    if r.numel == 0:
        return torch.zeros(r.shape, dtype=DTYPES[r.dtype])
    mant = bitpack.to_signed(bitpack.unpack(mant_stream, fmt.bits, r.numel), fmt.bits)
    exps = r.e_min + bitpack.unpack(exp_stream, r.e_width, r.n_exp).astype(np.int32)
    if r.e_width and int(exps.max()) > fmt.exp_max:
        raise PayloadError(
            f"tensor {r.name!r}: block exponent {int(exps.max())} out of the {fmt.exp_bits}-bit range "
            f"[{fmt.exp_min}, {fmt.exp_max}]"
        )
    m = torch.from_numpy(mant).reshape(r.shape)
    e = torch.from_numpy(exps).reshape(bfp.block_shape(r.shape, fmt))
    dtype = DTYPES[r.dtype]
    t = bfp.join(m, e, fmt, dtype)
    if bfp.may_overflow(e, dtype) and not bool(torch.isfinite(t).all()):
        raise PayloadError(f"tensor {r.name!r}: block-floating-point values overflow {r.dtype}")
    return t


def decode(
    payload: bytes | bytearray | memoryview,
    *,
    expect: Mapping[str, tuple[tuple[int, ...], torch.dtype]] | None = None,
    formats: Mapping[str, BFPFormat | None] | None = None,
    max_bytes: int = DEFAULT_LIMIT,
) -> dict[str, torch.Tensor]:
    """Parse and validate an lptfl-wire payload.

    Every size declared in the header is checked against the payload's actual stream
    lengths, against ``expect`` and against ``max_bytes`` before any tensor is built.

    Args:
        payload: the bytes received.
        expect: if given, the exact set of names with their ``(shape, dtype)``; any missing,
            extra or different tensor is an error.
        formats: if given, the number format each named tensor must travel in: a
            :class:`BFPFormat` (a block-floating-point record with its bits, exponent bits,
            layout and small-block rule; rounding is not on the wire) or ``None`` (a raw
            record, e.g. batch-norm statistics). Names not listed may take any format.
        max_bytes: upper bound on the payload length, on the decompressed body and on the
            total size of the decoded tensors.

    Returns:
        name -> CPU tensor, in the sender's order and with the sender's dtypes.

    Raises:
        PayloadError: for any invalid payload (the message names the problem).
    """
    if not isinstance(payload, (bytes, bytearray, memoryview)):
        raise TypeError(f"payload must be bytes, got {type(payload).__name__}")
    if not _is_int(max_bytes) or max_bytes <= 0:
        raise ValueError(f"max_bytes must be a positive integer, got {max_bytes!r}")
    if expect is not None:
        expect = _normalise_expect(expect)
    if formats is not None and not (isinstance(formats, Mapping)
                                    and all(f is None or isinstance(f, BFPFormat) for f in formats.values())):
        raise TypeError("formats must map names to a BFPFormat or None")
    try:
        return _decode(payload, expect, formats, max_bytes)
    except PayloadError:
        raise
    except Exception as exc:  # noqa: BLE001 -- last line of defence: any bytes -> PayloadError
        raise PayloadError(f"malformed payload (unexpected {type(exc).__name__}: {exc})") from exc


def _normalise_expect(expect) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
    if not isinstance(expect, Mapping):
        raise TypeError(f"expect must be a mapping name -> (shape, dtype), got {type(expect).__name__}")
    out = {}
    for name, spec in expect.items():
        try:
            shape, dtype = spec
            shape = tuple(int(d) for d in shape)
        except (TypeError, ValueError):
            raise TypeError(f"expect[{name!r}] must be (shape, dtype), got {spec!r}") from None
        if not isinstance(dtype, torch.dtype):
            raise TypeError(f"expect[{name!r}]: dtype must be a torch.dtype, got {dtype!r}")
        out[name] = (shape, dtype)
    return out


def _check_formats(records: list[_Record], formats: Mapping[str, BFPFormat | None]) -> None:
    for r in records:
        if r.name not in formats:
            continue
        want = formats[r.name]
        got = "a raw record" if r.fmt is None else r.fmt.wire_name
        if (want is None) != (r.fmt is None) or (want is not None and want.wire_name != got):
            expected = "a raw (full-precision) record" if want is None else want.wire_name
            raise PayloadError(f"tensor {r.name!r}: expected {expected}, got {got}")


def _decode(payload, expect, formats, max_bytes: int) -> dict[str, torch.Tensor]:
    body = unwrap(payload, max_bytes=max_bytes)
    meta, sizes = _parse_safetensors_header(body)
    records = _parse_header(meta, sizes, max_bytes)
    if expect is not None:
        _check_expect(records, expect)
    if formats is not None:
        _check_formats(records, formats)
    try:
        streams = safetensors.numpy.load(body)
    except Exception as exc:  # safetensors raises its own error types
        raise PayloadError(f"malformed safetensors body: {exc}") from None
    out: dict[str, torch.Tensor] = {}
    for r in records:
        stream = streams[r.key]
        if stream.dtype != np.uint8 or stream.shape != (sum(r.lengths),):
            raise PayloadError(f"tensor {r.name!r}: stream is {stream.dtype}{stream.shape}, expected uint8 bytes")
        out[r.name] = _decode_raw(r, stream) if r.kind == "raw" else _decode_bfp(r, stream)
    return out
