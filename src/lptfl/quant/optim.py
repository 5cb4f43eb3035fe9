"""A low-precision optimizer wrapper: quantize gradients, step, quantize weights.

``w <- Q_w(w - step(Q_g(grad)))`` with the inner optimizer's state in fp32, as in the
paper (REFERENCE §1, §3). Without formats the wrapper adds nothing to the step.
"""

from __future__ import annotations

from typing import Any

import torch

from lptfl.quant.compiled import MaybeCompiled
from lptfl.quant.format import BFPFormat
from lptfl.quant.quantize import quantize_with_key
from lptfl.quant.random import check_generator


def _quantize_all(tensors: list[torch.Tensor], fmt: BFPFormat, keys: torch.Tensor | None) -> list[torch.Tensor]:
    """Each tensor quantized; ``keys[i]`` is the rounding key of tensor i."""
    return [quantize_with_key(t, fmt, None if keys is None else keys[i]) for i, t in enumerate(tensors)]


class LowPrecisionOptimizer:
    """Wraps any ``torch.optim.Optimizer``.

    Args:
        optimizer: the inner optimizer (its state stays fp32).
        weight: format of the weights after each step (None: full precision).
        grad: format of the gradients before each step (None: full precision).
        generator: source of stochastic-rounding keys (seeded => reproducible).
        compile: fuse the per-tensor quantization with ``torch.compile`` (same results: the
            first compiled call is checked against eager, which replaces it if they differ).
        compile_mode: ``torch.compile``'s mode.

    Raises:
        TypeError: ``optimizer``, a format or ``generator`` has the wrong type.
    """

    def __init__(
        self,
        optimizer: torch.optim.Optimizer,
        *,
        weight: BFPFormat | None = None,
        grad: BFPFormat | None = None,
        generator: torch.Generator | None = None,
        compile: bool = False,
        compile_mode: str = "default",
    ) -> None:
        if not isinstance(optimizer, torch.optim.Optimizer):
            raise TypeError("optimizer must be a torch.optim.Optimizer (e.g. torch.optim.Adam(model.parameters())), "
                            f"got {type(optimizer).__name__}")
        for name, fmt in (("weight", weight), ("grad", grad)):
            if fmt is not None and not isinstance(fmt, BFPFormat):
                raise TypeError(f"{name} must be a BFPFormat or None, got {type(fmt).__name__}")
        check_generator(generator)
        self.optimizer = optimizer
        self.weight_format = weight
        self.grad_format = grad
        self.generator = generator
        # its results are copied into the parameters or gradients at once: no copy of its own needed
        self._quantize_all = MaybeCompiled(_quantize_all, enabled=compile, verify=0.0, copy_results=False,
                                           mode=compile_mode)

    @property
    def param_groups(self) -> list[dict[str, Any]]:
        return self.optimizer.param_groups

    @property
    def state(self) -> Any:
        return self.optimizer.state

    def _params(self) -> list[torch.Tensor]:
        return [p for group in self.optimizer.param_groups for p in group["params"]]

    def _keys(self, fmt: BFPFormat, count: int, device: torch.device) -> torch.Tensor | None:
        if fmt.rounding != "stochastic":
            return None
        keys = torch.randint(-(1 << 31), (1 << 31) - 1, (count,), dtype=torch.int32, generator=self.generator)
        if device.type == "cuda":  # from page-locked memory the copy does not wait for the device
            return keys.pin_memory().to(device, non_blocking=True)
        return keys.to(device)

    @torch.no_grad()
    def quantize_weights(self) -> None:
        """Round every parameter onto the weight grid, in place (no-op without a format)."""
        params = self._params()
        if self.weight_format is None or not params:
            return
        keys = self._keys(self.weight_format, len(params), params[0].device)
        # plain tensors, like the gradients: the compiled function is shared, not specialised twice
        detached = [p.detach() for p in params]
        torch._foreach_copy_(params, self._quantize_all(detached, self.weight_format, keys))

    @torch.no_grad()
    def quantize_grads(self) -> None:
        """Round every gradient onto the gradient grid, in place (no-op without a format)."""
        grads = [p.grad for p in self._params() if p.grad is not None]
        if self.grad_format is None or not grads:
            return
        keys = self._keys(self.grad_format, len(grads), grads[0].device)
        torch._foreach_copy_(grads, self._quantize_all(grads, self.grad_format, keys))

    def step(self) -> None:
        """Quantize gradients, take the inner step, quantize weights."""
        self.quantize_grads()
        self.optimizer.step()
        self.quantize_weights()

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.optimizer.zero_grad(set_to_none=set_to_none)

    def state_dict(self) -> dict[str, Any]:
        return self.optimizer.state_dict()

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.optimizer.load_state_dict(state_dict)
