"""Codec payloads inside Flower records: the bytes of :mod:`lptfl.codec` as one uint8 array.

The array travels as Flower's numpy ``Array`` (``np.save`` with ``allow_pickle=False``), so
what crosses the wire is never unpickled; its dtype, rank and size are checked before the
data are read, and the bytes are then decoded and validated by :func:`lptfl.codec.decode`.
The server announces the uplink format it accepts in the train config
(:data:`UPLINK_FORMAT_KEY`, :func:`format_label`), so a client with another policy fails early.
"""

from __future__ import annotations

import numpy as np
from flwr.app import Array, ArrayRecord

from lptfl.codec import PayloadError
from lptfl.quant import BFPFormat

PAYLOAD_KEY = "bytes"
GENERATOR_RECORD = "fedgen-generator"
"""Record key of FedGen's generator, sent with the model by lptfl's own ServerApp."""


def to_record(payload: bytes) -> ArrayRecord:
    """An ``ArrayRecord`` holding ``payload`` as a 1-D uint8 array."""
    return ArrayRecord({PAYLOAD_KEY: Array(np.frombuffer(payload, dtype=np.uint8).copy())})


def from_record(record: ArrayRecord, *, max_bytes: int = 1 << 30) -> bytes:
    """The payload bytes of a record made by :func:`to_record`.

    Raises:
        PayloadError: the record does not hold exactly one 1-D uint8 array of at most ``max_bytes``.
    """
    if not isinstance(record, ArrayRecord):
        raise PayloadError(f"expected an ArrayRecord with the single key {PAYLOAD_KEY!r}, got {type(record).__name__}")
    keys = list(record.keys())
    if keys != [PAYLOAD_KEY]:
        raise PayloadError(f"expected an ArrayRecord with the single key {PAYLOAD_KEY!r}, got the keys "
                           f"{keys[:3]}{' ...' if len(keys) > 3 else ''}")
    array = record[PAYLOAD_KEY]
    if array.dtype != "uint8" or len(array.shape) != 1:
        raise PayloadError(f"payload must be a 1-D uint8 array, got dtype {array.dtype} shape {tuple(array.shape)}")
    if array.shape[0] > max_bytes:
        raise PayloadError(f"payload of {array.shape[0]} bytes exceeds the limit of {max_bytes}")
    try:
        data = array.numpy()
    except Exception as err:  # a malformed .npy blob
        raise PayloadError(f"unreadable payload array: {err}") from err
    if data.dtype != np.uint8 or data.ndim != 1:
        raise PayloadError("payload array does not match its declared dtype/shape")
    return data.tobytes()


UPLINK_FORMAT_KEY = "lptfl-uplink-format"
"""Config-record key under which the strategy announces the uplink format it accepts."""

MODEL_RECORD_KEY = "lptfl-model-record"
"""Config-record key naming the ArrayRecord that holds the packed model (a message may carry
more, e.g. FedGen's generator)."""


def format_label(fmt: BFPFormat | None) -> str:
    """What of ``fmt`` is on the wire, as text: ``"bfp8e8-BC-FC"`` (no rounding), or ``"fp32"`` for None."""
    return "fp32" if fmt is None else fmt.wire_name
