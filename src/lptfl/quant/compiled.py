"""Optional ``torch.compile`` acceleration, checked against eager, with a safe eager fallback.

Compiling fuses the quantizer with its neighbours (block max, scaling, hashing, rounding
and clamping in one pass over memory). Where compilation is unavailable (no C++
compiler, an unsupported platform) the eager function is used and a warning is logged once.

A compiler can also be wrong without failing. With ``verify`` the first compiled call is
repeated eagerly and the two results compared (:func:`mismatch`); a compiled function
whose result differs is dropped for the eager one (whose result is returned), with a warning
that says by how much. When they agree the compiled result is returned, so the check changes
no result.
The low-precision functions are deterministic given their rounding keys, so compiled and
eager results agree exactly (quantizers) or up to float reassociation (whole models).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

import torch

log = logging.getLogger(__name__)

# torch.compile modes that replay CUDA graphs, whose results live in buffers the next replay reuses.
CUDA_GRAPH_MODES = ("reduce-overhead", "max-autotune")


def _tensors(value: Any) -> list[torch.Tensor]:
    if isinstance(value, torch.Tensor):
        return [value]
    if isinstance(value, (list, tuple)):
        return [t for item in value for t in _tensors(item)]
    return []


def _copied(value: Any) -> Any:
    """``value`` with every tensor in it (also inside lists and tuples) cloned."""
    if isinstance(value, torch.Tensor):
        return value.clone()
    if isinstance(value, (list, tuple)):
        return type(value)(_copied(item) for item in value)
    return value


def mismatch(compiled: Any, eager: Any, tolerance: float = 0.0, floor: float = 0.0) -> str | None:
    """Why ``compiled`` differs from ``eager`` (tensors, or lists/tuples of them), or None.

    Args:
        compiled: the compiled function's result.
        eager: the eager function's result for the same inputs.
        tolerance: 0 for exact agreement (NaN matching NaN); otherwise the largest allowed
            relative L2 difference ``|c - e| / max(|e|, floor)`` of each float tensor.
        floor: the L2 norm below which differences count absolutely (in the tensors' units),
            for results near zero whose relative differences mean nothing (e.g. a fitted loss).
    """
    ours, reference = _tensors(compiled), _tensors(eager)
    if len(ours) != len(reference):
        return f"{len(ours)} tensors instead of {len(reference)}"
    for i, (c, e) in enumerate(zip(ours, reference)):
        if c.shape != e.shape or c.dtype != e.dtype:
            return f"tensor {i}: {c.dtype}{list(c.shape)} instead of {e.dtype}{list(e.shape)}"
        if not e.is_floating_point():
            if not torch.equal(c, e):
                return f"tensor {i}: {int((c != e).sum())} of {e.numel()} values differ"
            continue
        c64, e64 = c.detach().double(), e.detach().double()
        nan_c, nan_e = torch.isnan(c64), torch.isnan(e64)
        if not torch.equal(nan_c, nan_e):
            return f"tensor {i}: NaN at {int((nan_c != nan_e).sum())} other positions"
        c64, e64 = c64.nan_to_num(0.0), e64.nan_to_num(0.0)
        if tolerance == 0.0:
            if not torch.equal(c64, e64):
                return f"tensor {i}: {int((c64 != e64).sum())} of {e.numel()} values differ"
            continue
        diff, scale = float(torch.linalg.vector_norm(c64 - e64)), float(torch.linalg.vector_norm(e64))
        reference = max(scale, floor, torch.finfo(torch.float32).tiny)
        if diff > tolerance * reference:
            return (f"tensor {i}: difference {diff:.3g} over a norm of {scale:.3g}, relative "
                    f"{diff / reference:.3g} > {tolerance:g}")
    return None


class MaybeCompiled:
    """Calls ``torch.compile(fn)`` when ``enabled``; falls back to ``fn`` for good on failure.

    Args:
        fn: the function (or module) to run.
        enabled: compile at all.
        verify: None, or the tolerance of :func:`mismatch` for checking the first compiled
            call against ``fn`` (only for functions without side effects).
        copy_results: copy every result as soon as it is returned; None (default): in the modes of
            ``CUDA_GRAPH_MODES``, whose next replay overwrites a graph's outputs, so that a result
            read after another compiled call (a training loss summed after the optimizer's step)
            is not gone (docs/measurements.md). Callers that use a result at once, before any
            other compiled call, pass False and save the copy.
        compile_options: passed to ``torch.compile``; ``dynamic`` defaults to False: callers give
            fixed shapes (short batches are padded), and a graph traced for symbolic shapes
            after a shape change compiles many times slower.
    """

    def __init__(self, fn: Callable[..., Any], *, enabled: bool = True, verify: float | None = None,
                 copy_results: bool | None = None, **compile_options: Any) -> None:
        self.fn = fn
        self.enabled = enabled
        self.verify = verify
        compile_options.setdefault("dynamic", False)
        if copy_results is None:
            copy_results = compile_options.get("mode") in CUDA_GRAPH_MODES
        self._copy_results = copy_results
        self._compiled = torch.compile(fn, **compile_options) if enabled else None

    @property
    def active(self) -> bool:
        """Whether calls still go to the compiled function."""
        return self._compiled is not None

    def disable(self, reason: str) -> None:
        """Use ``fn`` from now on, logging ``reason`` once."""
        if self._compiled is not None:
            log.warning("%s; continuing in eager mode", reason)
        self._compiled = None

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        if self._compiled is None:
            return self.fn(*args, **kwargs)
        try:
            result = self._compiled(*args, **kwargs)
        except Exception as err:  # compilation toolchain missing or backend failure
            self.disable(f"torch.compile failed ({type(err).__name__}: {err})")
            return self.fn(*args, **kwargs)
        if self._copy_results:
            result = _copied(result)
        if self.verify is None:
            return result
        tolerance, self.verify = self.verify, None
        eager = self.fn(*args, **kwargs)
        why = mismatch(result, eager, tolerance)
        if why is not None:
            name = getattr(self.fn, "__qualname__", type(self.fn).__name__)
            self.disable(f"torch.compile gave a wrong result for {name} ({why})")
            return eager
        return result  # agreed: the check changes no result
