"""LeNet-5 (LeCun et al., 1998), the classic 1x32x32 digit network.

torchvision has no LeNet, so it lives here, shaped like torchvision's classifiers
(``features`` then ``classifier``) so that the registry treats it like any other CNN.
C5 is a 5x5 convolution over the 5x5 maps of S4, as in the paper, so the last
convolutional feature map is 120x1x1 and its global average pool is 120-d; F6 (84-d) is
the input of the output layer.
"""

from __future__ import annotations

import torch
from torch import nn


class LeNet5(nn.Module):
    """LeNet-5 with tanh activations and average-pool subsampling.

    Input: (B, 1, 32, 32) float. Output: (B, num_classes) logits.
    """

    def __init__(self, *, num_classes: int = 10) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(1, 6, kernel_size=5),  # C1: 6@28x28
            nn.Tanh(),
            nn.AvgPool2d(kernel_size=2),  # S2: 6@14x14
            nn.Conv2d(6, 16, kernel_size=5),  # C3: 16@10x10
            nn.Tanh(),
            nn.AvgPool2d(kernel_size=2),  # S4: 16@5x5
            nn.Conv2d(16, 120, kernel_size=5),  # C5: 120@1x1
            nn.Tanh(),
        )
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Sequential(
            nn.Linear(120, 84),  # F6
            nn.Tanh(),
            nn.Linear(84, num_classes),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.avgpool(self.features(x))
        return self.classifier(torch.flatten(x, 1))


def lenet5(*, weights: None = None, num_classes: int = 10) -> LeNet5:
    """Builder with torchvision's signature; LeNet-5 has no published weights."""
    if weights is not None:
        raise ValueError("lenet5 has no published weights; pass a checkpoint path instead")
    return LeNet5(num_classes=num_classes)
