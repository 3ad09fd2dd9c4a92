"""The two LeNets of the pruning literature (used by SNIP, Lee et al. 2019, among others).

* :class:`LeNet300100` -- the MLP 784-300-100-10 with ReLU (LeCun et al. 1998; 266,610 parameters).
  Layers ``fc1``, ``fc2``, ``fc3``.  Accepts ``(N, 1, 28, 28)`` or ``(N, 784)`` input.
* :class:`LeNet5Caffe` -- the Caffe "LeNet" example: ``conv1`` 20 5x5 -> max-pool 2 -> ``conv2`` 50 5x5
  -> max-pool 2 -> ``fc1`` 800->500 -> ReLU -> ``fc2`` 500->10 (431,080 parameters).  As in Caffe's
  ``lenet_train_test.prototxt`` there is no non-linearity after the convolutions (only the max-pools);
  ``conv_relu=True`` adds ReLUs there.  Needs ``(N, 1, 28, 28)`` input.

Plain ``nn.Module`` s with PyTorch's default initialisation; ``torch.fx``-traceable.
"""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["LeNet300100", "LeNet5Caffe", "lenet_300_100", "lenet5_caffe"]


class LeNet300100(nn.Module):
    """MLP ``in_features`` -> 300 -> 100 -> ``num_classes`` with ReLUs."""

    def __init__(self, num_classes: int = 10, in_features: int = 784) -> None:
        super().__init__()
        self.fc1 = nn.Linear(in_features, 300)
        self.fc2 = nn.Linear(300, 100)
        self.fc3 = nn.Linear(100, num_classes)
        self.relu = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.flatten(x, 1)
        x = self.relu(self.fc1(x))
        x = self.relu(self.fc2(x))
        return self.fc3(x)


class LeNet5Caffe(nn.Module):
    """Caffe's LeNet: conv 20 5x5, pool, conv 50 5x5, pool, fc 500, ReLU, fc ``num_classes``."""

    def __init__(self, num_classes: int = 10, in_channels: int = 1, conv_relu: bool = False) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, 20, 5)
        self.conv2 = nn.Conv2d(20, 50, 5)
        self.pool = nn.MaxPool2d(2, 2)
        self.fc1 = nn.Linear(50 * 4 * 4, 500)
        self.fc2 = nn.Linear(500, num_classes)
        self.relu = nn.ReLU()
        self.conv_relu = bool(conv_relu)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv1(x)
        if self.conv_relu:
            x = self.relu(x)
        x = self.pool(x)
        x = self.conv2(x)
        if self.conv_relu:
            x = self.relu(x)
        x = self.pool(x)
        x = torch.flatten(x, 1)
        x = self.relu(self.fc1(x))
        return self.fc2(x)


def lenet_300_100(num_classes: int = 10, in_features: int = 784) -> LeNet300100:
    """LeNet-300-100 (MLP 784-300-100-10)."""
    return LeNet300100(num_classes=num_classes, in_features=in_features)


def lenet5_caffe(num_classes: int = 10, in_channels: int = 1, conv_relu: bool = False) -> LeNet5Caffe:
    """LeNet-5-Caffe (conv 20 5x5, pool, conv 50 5x5, pool, fc 500, fc 10); input 1x28x28."""
    return LeNet5Caffe(num_classes=num_classes, in_channels=in_channels, conv_relu=conv_relu)
