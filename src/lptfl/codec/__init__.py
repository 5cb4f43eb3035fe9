"""The wire format: state dict <-> bytes (``docs/wire-format.md``).

Float tensors travel as block-floating-point records (two's-complement mantissas bit-packed
to exactly ``bits`` bits, block exponents as bit-packed offsets from the tensor's smallest
one); full-precision and integer tensors travel exactly. The container is a safetensors
file (no pickle) inside a small checksummed frame, optionally zstd-compressed.

    payload = encode(state, BFPFormat(8, layout="BC"), full_precision=bn_stats)
    state = decode(payload, expect={n: (tuple(t.shape), t.dtype) for n, t in model.state_dict().items()})
"""

from lptfl.codec.errors import PayloadError
from lptfl.codec.wire import DEFAULT_LIMIT, FORMAT_NAME, FORMAT_VERSION, decode, encode

__all__ = ["DEFAULT_LIMIT", "FORMAT_NAME", "FORMAT_VERSION", "PayloadError", "decode", "encode"]
