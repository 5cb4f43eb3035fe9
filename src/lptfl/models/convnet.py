"""The paper's ConvNet: ``depth`` blocks of [Conv3x3 -> Norm -> Act -> Pool], then a linear classifier."""

from __future__ import annotations

from torch import nn

NORMS = ("instancenorm", "groupnorm", "batchnorm", "layernorm", "none")
ACTIVATIONS = ("relu", "leakyrelu", "sigmoid")
POOLINGS = ("avgpooling", "maxpooling", "none")


def _norm(kind: str, channels: int, size: int) -> nn.Module:
    if kind == "instancenorm":
        return nn.GroupNorm(channels, channels, affine=True)
    if kind == "groupnorm":
        return nn.GroupNorm(4, channels, affine=True)
    if kind == "batchnorm":
        return nn.BatchNorm2d(channels)
    if kind == "layernorm":
        return nn.LayerNorm([channels, size, size], elementwise_affine=True)
    return nn.Identity()


def _activation(kind: str) -> nn.Module:
    if kind == "relu":
        return nn.ReLU()
    if kind == "leakyrelu":
        return nn.LeakyReLU(0.01)
    return nn.Sigmoid()


class ConvNet(nn.Module):
    """ConvNet of REFERENCE §3.

    Input ``N x C x H x W`` (square); output logits ``N x num_classes``. For 28x28 inputs
    with one channel the first convolution pads by 3 so the feature map is 32x32.
    ``features`` maps images to flat features (``N x feature_dim``), ``classifier`` maps
    features to logits.
    """

    def __init__(
        self,
        in_channels: int,
        num_classes: int,
        image_size: int,
        *,
        width: int = 128,
        depth: int = 3,
        norm: str = "instancenorm",
        activation: str = "relu",
        pooling: str = "avgpooling",
    ) -> None:
        super().__init__()
        if norm not in NORMS:
            raise ValueError(f"norm must be one of {NORMS}, got {norm!r}")
        if activation not in ACTIVATIONS:
            raise ValueError(f"activation must be one of {ACTIVATIONS}, got {activation!r}")
        if pooling not in POOLINGS:
            raise ValueError(f"pooling must be one of {POOLINGS}, got {pooling!r}")
        if depth < 1 or width < 1:
            raise ValueError(f"depth and width must be >= 1, got depth={depth}, width={width}")
        layers: list[nn.Module] = []
        channels, size = in_channels, image_size
        for d in range(depth):
            padding = 3 if (in_channels == 1 and d == 0 and image_size == 28) else 1
            layers.append(nn.Conv2d(channels, width, kernel_size=3, padding=padding))
            size = size + 2 * padding - 2
            layers += [_norm(norm, width, size), _activation(activation)]
            channels = width
            if pooling != "none":
                if size < 2:
                    raise ValueError(f"depth {depth} pools a {image_size}px input below 1px")
                layers.append(nn.AvgPool2d(2) if pooling == "avgpooling" else nn.MaxPool2d(2))
                size //= 2
        layers.append(nn.Flatten())
        self.features = nn.Sequential(*layers)
        self.feature_dim = channels * size * size
        self.classifier = nn.Linear(self.feature_dim, num_classes)

    def forward(self, x):
        return self.classifier(self.features(x))
