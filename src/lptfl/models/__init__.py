"""The paper's models: ConvNet, MLP, ResNet-8, ResNet-18, and a registry by name."""

from lptfl.models.convnet import ConvNet
from lptfl.models.mlp import MLP
from lptfl.models.registry import MODELS, build_model
from lptfl.models.resnet import ResNet, resnet8, resnet18

__all__ = ["MODELS", "ConvNet", "MLP", "ResNet", "build_model", "resnet8", "resnet18"]
