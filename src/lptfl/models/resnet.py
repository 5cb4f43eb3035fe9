"""CIFAR-style ResNets with BatchNorm: ResNet-8 (16/32/64 channels) and ResNet-18 (64..512)."""

from __future__ import annotations

from torch import nn


class BasicBlock(nn.Module):
    """conv3x3-BN-ReLU-conv3x3-BN, plus the (1x1 conv + BN when the shape changes) shortcut, then ReLU."""

    def __init__(self, in_planes: int, planes: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu1 = nn.ReLU()
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.shortcut = nn.Sequential()
        if stride != 1 or in_planes != planes:
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_planes, planes, 1, stride=stride, bias=False), nn.BatchNorm2d(planes)
            )
        self.relu2 = nn.ReLU()

    def forward(self, x):
        out = self.relu1(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu2(out + self.shortcut(x))


class ResNet(nn.Module):
    """Stem conv3x3-BN-ReLU, stages of BasicBlocks, global average pool, linear classifier.

    Input ``N x C x H x W``; ``features`` gives ``N x widths[-1]``.
    """

    def __init__(self, in_channels: int, num_classes: int, *, widths: tuple[int, ...], blocks: tuple[int, ...]) -> None:
        super().__init__()
        layers: list[nn.Module] = [
            nn.Conv2d(in_channels, widths[0], 3, padding=1, bias=False),
            nn.BatchNorm2d(widths[0]),
            nn.ReLU(),
        ]
        in_planes = widths[0]
        for stage, (planes, count) in enumerate(zip(widths, blocks)):
            for i in range(count):
                stride = 2 if (stage > 0 and i == 0) else 1
                layers.append(BasicBlock(in_planes, planes, stride))
                in_planes = planes
        layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten()]
        self.features = nn.Sequential(*layers)
        self.feature_dim = in_planes
        self.classifier = nn.Linear(in_planes, num_classes)

    def forward(self, x):
        return self.classifier(self.features(x))


def resnet8(in_channels: int, num_classes: int, image_size: int) -> ResNet:
    """ResNet-8: one BasicBlock per stage, 16/32/64 channels."""
    return ResNet(in_channels, num_classes, widths=(16, 32, 64), blocks=(1, 1, 1))


def resnet18(in_channels: int, num_classes: int, image_size: int) -> ResNet:
    """ResNet-18: two BasicBlocks per stage, 64/128/256/512 channels."""
    return ResNet(in_channels, num_classes, widths=(64, 128, 256, 512), blocks=(2, 2, 2, 2))
