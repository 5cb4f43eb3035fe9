"""Counter-based uniform random numbers for stochastic rounding.

``torch.rand_like`` costs several nanoseconds per element on a CPU and cannot be fused
with the rounding. Here each element's uniform draw is a hash of its linear index and a
32-bit key, computed with int32 arithmetic (wrapping multiplication, masked shifts), so
it is element-wise, fusable by ``torch.compile`` and identical on CPU and CUDA, eager or
compiled. The hash is Wellons' "lowbias32" finaliser applied to ``(index ^ key) * phi``
(multiplying the index first lets inductor fold it into a strided ``arange``, which
crashed its CPU code generator in torch 2.13).
"""

from __future__ import annotations

import torch

_PHI = -1640531527  # 0x9E3779B9 as a signed int32
_M1 = 0x7FEB352D
_M2 = -2073254261  # 0x846CA68B as a signed int32
_INV_2_24 = 1.0 / (1 << 24)
# Eager on a CPU, tensors of more than EAGER_CHUNKED_FROM elements (beyond the last-level cache) are
# hashed EAGER_CHUNK elements (512 KiB) at a time; smaller ones gain nothing (docs/measurements.md)
EAGER_CHUNK = 1 << 17
EAGER_CHUNKED_FROM = 1 << 20


def _lshr(h: torch.Tensor, k: int) -> torch.Tensor:
    """Logical right shift of an int32 tensor by ``k`` bits."""
    return (h >> k) & ((1 << (32 - k)) - 1)


def _lowbias32_(h: torch.Tensor) -> torch.Tensor:
    """Wellons' lowbias32 on an int32 tensor, in place (fewer passes over memory when eager)."""
    h.bitwise_xor_(_lshr(h, 16))
    h.mul_(_M1)
    h.bitwise_xor_(_lshr(h, 15))
    h.mul_(_M2)
    h.bitwise_xor_(_lshr(h, 16))
    return h


def _lowbias32(h: torch.Tensor) -> torch.Tensor:
    return _lowbias32_(h.clone())


def _uniform_of_index(h: torch.Tensor, key: torch.Tensor) -> torch.Tensor:
    """The uniform draws of the int32 element indices ``h`` (changed in place) under ``key``."""
    h.bitwise_xor_(key).mul_(_PHI)
    _lowbias32_(h)
    return _lshr(h, 8).to(torch.float32).mul_(_INV_2_24)


def hashed_uniform_like(x: torch.Tensor, key: torch.Tensor) -> torch.Tensor:
    """Uniform float32 values in ``[0, 1)`` with 24 random bits each, shaped like ``x``.

    Eager on a CPU, a large tensor is hashed :data:`EAGER_CHUNK` elements at a time: the hash's dozen
    element-wise passes then run in cache instead of over memory (the same values; compiled, they
    are fused into one pass anyway).

    Args:
        x: any tensor (at most 2**31 - 1 elements); only its shape and device are used.
        key: 0-d int32 tensor; different keys give independent-looking streams.
    """
    n = x.numel()
    if n <= EAGER_CHUNKED_FROM or x.device.type != "cpu" or torch.compiler.is_compiling():
        return _uniform_of_index(torch.arange(n, dtype=torch.int32, device=x.device), key).view(x.shape)
    out = torch.empty(n, dtype=torch.float32)
    for start in range(0, n, EAGER_CHUNK):
        stop = min(start + EAGER_CHUNK, n)
        out[start:stop] = _uniform_of_index(torch.arange(start, stop, dtype=torch.int32), key)
    return out.view(x.shape)


def hashed_uniform_cohort(x: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
    """:func:`hashed_uniform_like` for a cohort: ``x`` is ``K x ...`` (one client per row of
    dim 0) and ``keys`` holds the ``K`` clients' int32 keys. Row ``k`` equals
    ``hashed_uniform_like(x[k], keys[k])``: each client's draws are those it would get alone.
    """
    index = torch.arange(x[0].numel(), dtype=torch.int32, device=x.device).view(1, *x.shape[1:])
    h = torch.bitwise_xor(index, keys.view(-1, *([1] * (x.ndim - 1)))).mul_(_PHI)
    _lowbias32_(h)
    return _lshr(h, 8).to(torch.float32).mul_(_INV_2_24)


def mix_key(key: torch.Tensor, salt: int) -> torch.Tensor:
    """A new int32 key derived from ``key`` and a small integer ``salt``."""
    return _lowbias32(key ^ (salt * _M1 & 0x7FFFFFFF))


def check_generator(generator: object) -> None:
    """Raise ``TypeError`` unless ``generator`` is a ``torch.Generator`` or None (an int seed is not)."""
    if generator is not None and not isinstance(generator, torch.Generator):
        raise TypeError("generator must be a torch.Generator (e.g. torch.Generator().manual_seed(0)) or None, "
                        f"got {type(generator).__name__}")


def draw_key(generator: torch.Generator | None = None, device: torch.device | str = "cpu") -> torch.Tensor:
    """Draw a fresh 0-d int32 key from ``generator`` (or torch's default generator); its public
    callers have checked ``generator`` (:func:`check_generator`)."""
    if generator is not None:
        device = generator.device
    return torch.randint(-(1 << 31), (1 << 31) - 1, (), dtype=torch.int32, generator=generator, device=device)
