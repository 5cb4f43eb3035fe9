"""Models by the paper's names: ``ConvNet``, ``MLP``, ``resnet8``, ``resnet18``."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from torch import nn

from lptfl.models.convnet import ConvNet
from lptfl.models.mlp import MLP
from lptfl.models.resnet import resnet8, resnet18

MODELS: dict[str, Callable[..., nn.Module]] = {
    "ConvNet": ConvNet,
    "MLP": MLP,
    "resnet8": resnet8,
    "resnet18": resnet18,
}


def build_model(name: str, in_channels: int, num_classes: int, image_size: int, **options: Any) -> nn.Module:
    """Build model ``name`` for ``in_channels x image_size x image_size`` inputs and ``num_classes`` classes."""
    lookup = {key.lower(): key for key in MODELS}
    key = lookup.get(name.lower())
    if key is None:
        raise ValueError(f"unknown model {name!r}; expected one of {sorted(MODELS)}")
    return MODELS[key](in_channels, num_classes, image_size, **options)
