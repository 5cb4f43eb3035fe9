"""Putting activation/error quantizers into any ``nn.Module`` at the paper's positions.

Positions (REFERENCE §3): after every convolution and linear layer (the last classifier
included), after every activation function (norm + activation), after every pooling layer.
Quantizers are attached as a child module ``output_quantizer`` plus a forward hook, so the
model's code is untouched and its state-dict keys do not change.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn

from lptfl.quant.activation import Quantizer
from lptfl.quant.format import BFPFormat

LINEAR_TYPES: tuple[type[nn.Module], ...] = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)
ACTIVATION_TYPES: tuple[type[nn.Module], ...] = (
    nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.GELU, nn.SiLU, nn.ELU, nn.Tanh, nn.Sigmoid, nn.Hardswish, nn.Mish,
)
POOL_TYPES: tuple[type[nn.Module], ...] = (
    nn.AvgPool1d, nn.AvgPool2d, nn.AvgPool3d, nn.MaxPool1d, nn.MaxPool2d, nn.MaxPool3d,
    nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d, nn.AdaptiveAvgPool3d,
    nn.AdaptiveMaxPool1d, nn.AdaptiveMaxPool2d, nn.AdaptiveMaxPool3d,
)
POSITIONS = {"linear": LINEAR_TYPES, "activation": ACTIVATION_TYPES, "pool": POOL_TYPES}

_ATTR = "output_quantizer"


def _apply_output_quantizer(module: nn.Module, inputs: tuple, output: torch.Tensor) -> torch.Tensor:
    return getattr(module, _ATTR)(output)


def insert_quantizers(
    model: nn.Module,
    activation: BFPFormat | None,
    error: BFPFormat | None,
    *,
    positions: Iterable[str] = ("linear", "activation", "pool"),
) -> list[Quantizer]:
    """Attach a :class:`Quantizer` after every module of the given kinds, in place.

    Args:
        model: any module; its submodules of the kinds in ``positions`` get a quantizer.
        activation: format of forward activations (None: not quantized).
        error: format of backward errors (None: not quantized).
        positions: any of ``"linear"`` (conv and linear layers), ``"activation"``, ``"pool"``
            (a single string is one position).

    Returns:
        The quantizers, in module order. Calling again replaces the formats.
    """
    positions = (positions,) if isinstance(positions, str) else tuple(positions)
    unknown = [p for p in positions if p not in POSITIONS]
    if unknown:
        raise ValueError(f"unknown quantizer positions {unknown}; expected a subset of {sorted(POSITIONS)}")
    kinds = tuple(t for p in positions for t in POSITIONS[p])
    quantizers = []
    for module in list(model.modules()):
        if isinstance(module, Quantizer) or not isinstance(module, kinds):
            continue
        quantizer = Quantizer(activation, error)
        if hasattr(module, _ATTR):
            setattr(module, _ATTR, quantizer)
        else:
            module.add_module(_ATTR, quantizer)
            module.register_forward_hook(_apply_output_quantizer)
        quantizers.append(quantizer)
    if quantizers:
        device = next((t.device for t in [*model.parameters(), *model.buffers()]), None)
        if device is not None:
            for q in quantizers:
                q.to(device)
    return quantizers


def quantizers_of(model: nn.Module) -> list[Quantizer]:
    """All quantizers inside ``model``, in module order."""
    return [m for m in model.modules() if isinstance(m, Quantizer)]


def reseed_quantizers(model: nn.Module, generator: torch.Generator | None = None) -> None:
    """Give every quantizer of ``model`` a fresh rounding key drawn from ``generator``.

    Call before each training step for stochastic rounding; one draw covers all quantizers.
    """
    quantizers = quantizers_of(model)
    if not quantizers:
        return
    keys = torch.randint(
        -(1 << 31), (1 << 31) - 1, (len(quantizers),), dtype=torch.int32, generator=generator
    )
    # fill_ with a Python int: on CUDA a kernel argument, not a copy that waits for the device
    for quantizer, key in zip(quantizers, keys.tolist()):
        quantizer.key.fill_(key)
