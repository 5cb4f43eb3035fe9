"""Keep freed tensor memory in the process instead of returning it to the OS after every op.

glibc's ``malloc`` serves large blocks (a ConvNet activation of batch 32 is 16 MB) with ``mmap``
and gives them back on ``free``, so every training step maps, page-faults and zeroes the same
memory again, a sizeable share of a small model's step (docs/measurements.md).
Raising the mmap and trim thresholds lets those blocks be reused. Applications (the CLI, the
Flower client) call :func:`keep_freed_memory` once at start; the library never does it on import.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import sys

log = logging.getLogger(__name__)

# mallopt parameters (glibc <malloc.h>).
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
# Blocks below this are served from the heap and kept there when freed (bytes).
THRESHOLD_BYTES = 1 << 30

_applied: bool | None = None


def keep_freed_memory() -> bool:
    """Raise glibc's mmap and trim thresholds to :data:`THRESHOLD_BYTES`; ``True`` if applied.

    Does nothing (``False``) where the C library is not glibc (macOS, Windows, musl). Calling it
    again returns the first call's answer. Memory a step frees stays with the process for the next
    step, so the resident size stays near the peak instead of falling between steps.
    """
    global _applied
    if _applied is not None:
        return _applied
    _applied = False
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        log.debug("no glibc mallopt here; the allocator keeps its defaults")
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    _applied = bool(mallopt(_M_MMAP_THRESHOLD, THRESHOLD_BYTES)) and bool(mallopt(_M_TRIM_THRESHOLD, THRESHOLD_BYTES))
    log.debug("malloc mmap/trim thresholds raised to %d bytes: %s", THRESHOLD_BYTES, _applied)
    return _applied
