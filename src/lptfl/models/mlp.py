"""The paper's MLP: two hidden layers of 128 units with ReLU."""

from __future__ import annotations

from torch import nn


class MLP(nn.Module):
    """Flatten -> Linear(hidden) -> ReLU -> Linear(hidden) -> ReLU -> Linear(num_classes).

    Input ``N x C x H x W``; ``features`` gives ``N x hidden``; ``classifier`` the logits.
    """

    def __init__(self, in_channels: int, num_classes: int, image_size: int, *, hidden: int = 128) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Flatten(),
            nn.Linear(in_channels * image_size * image_size, hidden),
            nn.ReLU(),
            nn.Linear(hidden, hidden),
            nn.ReLU(),
        )
        self.feature_dim = hidden
        self.classifier = nn.Linear(hidden, num_classes)

    def forward(self, x):
        return self.classifier(self.features(x))
