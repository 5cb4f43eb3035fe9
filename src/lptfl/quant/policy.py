"""The precision policy: every word length, layout and rounding choice of a run in one object."""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch
from torch import nn

from lptfl.quant.format import BFPFormat
from lptfl.quant.insert import insert_quantizers
from lptfl.quant.optim import LowPrecisionOptimizer

COMPUTE_MODES = ("auto", "bf16", "fp32")
# how the served model travels to the clients: Q(wbar) rounded to nearest or stochastically, or unquantized
DOWNLINK_MODES = ("nearest", "stochastic", "fp32")


@dataclass(frozen=True)
class PrecisionPolicy:
    """How a run quantizes.

    Attributes:
        weight: format of the weights after each local step (None: fp32).
        grad: format of the weight gradients before each step (None: fp32).
        activation: format of forward activations (None: fp32).
        error: format of back-propagated errors (None: fp32).
        downlink: format of the model the server sends (``Q(wbar)``; None: fp32).
        uplink: format of the model a client sends back (None: fp32).
        compute: ``"bf16"`` runs conv/linear products in bfloat16 with fp32 accumulation
            when both operands are on a <= 8-bit grid (exact operands), ``"fp32"`` never,
            ``"auto"`` when the hardware does bf16 products fast (see
            :func:`lptfl.quant.compute.fast_bf16_available`).
    """

    weight: BFPFormat | None = None
    grad: BFPFormat | None = None
    activation: BFPFormat | None = None
    error: BFPFormat | None = None
    downlink: BFPFormat | None = None
    uplink: BFPFormat | None = None
    compute: str = "auto"

    def __post_init__(self) -> None:
        if self.compute not in COMPUTE_MODES:
            raise ValueError(f"compute must be one of {COMPUTE_MODES}, got {self.compute!r}")
        for name in ("weight", "grad", "activation", "error", "downlink", "uplink"):
            fmt = getattr(self, name)
            if fmt is not None and not isinstance(fmt, BFPFormat):
                raise TypeError(f"{name} must be a BFPFormat or None, got {type(fmt).__name__}")

    @property
    def is_full_precision(self) -> bool:
        """True when nothing is quantized (the fp32 path, with no overhead)."""
        return all(
            getattr(self, n) is None for n in ("weight", "grad", "activation", "error", "downlink", "uplink")
        )

    @property
    def quantizes_activations(self) -> bool:
        return self.activation is not None or self.error is not None

    @classmethod
    def full_precision(cls) -> "PrecisionPolicy":
        """Plain fp32 training and communication."""
        return cls(compute="fp32")

    @classmethod
    def low_precision(
        cls,
        bits: int = 8,
        *,
        weight_bits: int | None = None,
        activation_bits: int | None = None,
        grad_bits: int | None = None,
        layout: str = "BC",
        small_block: str = "FC",
        rounding: str = "stochastic",
        exp_bits: int = 8,
        activation_layout: str = "tensor",
        downlink: str = "nearest",
        compute: str = "auto",
    ) -> "PrecisionPolicy":
        """The paper's setting: W/A/G (and E) in ``bits`` bits unless mixed word lengths are given.

        Weights and gradients use ``layout`` (BC in the paper); activations and errors use
        ``activation_layout`` (one exponent per tensor, as the published code). Errors take
        the activation word length; the uplink the weight format. The downlink ``Q(wbar)`` is
        the weight format with ``downlink`` rounding: ``"nearest"``, or ``"stochastic"``
        (unbiased: a change of the served model smaller than half a grid step reaches the
        clients in expectation instead of being rounded away); ``"fp32"`` sends the served
        model unquantized, as the published code does.
        """
        if downlink not in DOWNLINK_MODES:
            raise ValueError(f"downlink must be one of {DOWNLINK_MODES}, got {downlink!r}")
        w_bits = bits if weight_bits is None else weight_bits
        a_bits = bits if activation_bits is None else activation_bits
        g_bits = bits if grad_bits is None else grad_bits
        weight = BFPFormat(w_bits, exp_bits=exp_bits, layout=layout, small_block=small_block, rounding=rounding)
        act = BFPFormat(a_bits, exp_bits=exp_bits, layout=activation_layout, small_block=small_block, rounding=rounding)
        return cls(
            weight=weight,
            grad=replace(weight, bits=g_bits),
            activation=act,
            error=act,
            downlink=None if downlink == "fp32" else weight.with_rounding(downlink),
            uplink=weight,
            compute=compute,
        )

    @classmethod
    def preset(cls, name: str) -> "PrecisionPolicy":
        """``"paper-8bit"``, ``"paper-6bit"`` or ``"fp32"``."""
        if name == "fp32":
            return cls.full_precision()
        if name == "paper-8bit":
            return cls.low_precision(8)
        if name == "paper-6bit":
            return cls.low_precision(6)
        raise ValueError(f"unknown precision preset {name!r}; expected 'paper-8bit', 'paper-6bit' or 'fp32'")

    def prepare_model(self, model: nn.Module, example_input: torch.Tensor | None = None) -> nn.Module:
        """Insert activation/error quantizers, switch eligible layers to bf16 compute and, with
        <= 8-bit activations, to layers that save for backward in the values' own format
        (:mod:`lptfl.quant.compact`).

        ``example_input`` (one batch) lets the switches find which layers receive quantized
        inputs; without it layers stay as they are. Returns ``model`` (changed in place).
        """
        if self.quantizes_activations:
            insert_quantizers(model, self.activation, self.error)
        if example_input is not None and self.uses_bf16(example_input.device):
            from lptfl.quant.compute import enable_bf16_compute

            enable_bf16_compute(model, example_input)
        if example_input is not None and self.activation is not None and self.activation.bits <= 8:
            from lptfl.quant.compact import enable_compact_saving

            enable_compact_saving(model, example_input)
        return model

    def uses_bf16(self, device: torch.device) -> bool:
        """Whether conv/linear products run in bf16 on ``device`` under this policy."""
        if self.compute == "fp32" or not self._operands_fit_bf16():
            return False
        if self.compute == "bf16":
            return True
        from lptfl.quant.compute import fast_bf16_available

        return fast_bf16_available(device)

    def _operands_fit_bf16(self) -> bool:
        # an unquantized downlink starts each round's local training from weights off the grid
        fmts = (self.weight, self.activation, self.error, self.downlink)
        return all(f is not None and f.bits <= 8 for f in fmts)

    def wrap_optimizer(
        self,
        optimizer: torch.optim.Optimizer,
        generator: torch.Generator | None = None,
        *,
        compile: bool = False,
        compile_mode: str = "default",
    ) -> LowPrecisionOptimizer | torch.optim.Optimizer:
        """The optimizer with gradient/weight quantization, or unchanged at full precision."""
        if self.weight is None and self.grad is None:
            return optimizer
        return LowPrecisionOptimizer(
            optimizer, weight=self.weight, grad=self.grad, generator=generator, compile=compile,
            compile_mode=compile_mode,
        )
