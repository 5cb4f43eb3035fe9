"""Optional ``torch.compile`` acceleration, with a safe eager fallback.

Compiling fuses the quantizer with its neighbours (block max, scaling, hashing, rounding
and clamping in one pass over memory). Where compilation is unavailable (no C++
compiler, an unsupported platform) the eager function is used and a warning is logged once.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

import torch

log = logging.getLogger(__name__)


class MaybeCompiled:
    """Calls ``torch.compile(fn)`` when ``enabled``; falls back to ``fn`` for good on failure."""

    def __init__(self, fn: Callable[..., Any], *, enabled: bool = True, **compile_options: Any) -> None:
        self.fn = fn
        self.enabled = enabled
        self._compiled = torch.compile(fn, **compile_options) if enabled else None

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        if self._compiled is None:
            return self.fn(*args, **kwargs)
        try:
            return self._compiled(*args, **kwargs)
        except Exception as err:  # compilation toolchain missing or backend failure
            log.warning("torch.compile failed (%s: %s); continuing in eager mode", type(err).__name__, err)
            self._compiled = None
            return self.fn(*args, **kwargs)
