"""CIFAR ResNets (He et al. 2016, section 4.2): ResNet-20/32/44/56/110.

The module and parameter names follow the layout of the widely used pretrained CIFAR-10 checkpoints
(``conv1``/``bn1``, ``layer1..3`` of ``BasicBlock``s, ``linear``), so their state dicts load
strictly.  Where the shape changes, the shortcut is parameter-free ("option A"): subsample by 2 and
zero-pad the channel dimension.  Everything is traceable by ``torch.fx.symbolic_trace``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

DEPTHS = {"resnet20": 3, "resnet32": 5, "resnet44": 7, "resnet56": 9, "resnet110": 18}


class PadShortcut(nn.Module):
    """Option-A shortcut: ``x[:, :, ::2, ::2]`` zero-padded by ``planes // 4`` channels on each side."""

    def __init__(self, planes: int):
        super().__init__()
        self.planes = planes
        self.pad = planes // 4

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.pad(x[:, :, ::2, ::2], (0, 0, 0, 0, self.pad, self.pad))

    def extra_repr(self) -> str:
        return f"planes={self.planes}"


class BasicBlock(nn.Module):
    expansion = 1

    def __init__(self, in_planes: int, planes: int, stride: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        if stride != 1 or in_planes != planes:
            if stride != 2 or in_planes + 2 * (planes // 4) != planes:
                raise ValueError(
                    f"option-A shortcut needs stride 2 and planes == 2*in_planes "
                    f"(got in_planes={in_planes}, planes={planes}, stride={stride})"
                )
            self.shortcut: nn.Module = PadShortcut(planes)
        else:
            self.shortcut = nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        out = out + self.shortcut(x)
        return F.relu(out)


class CifarResNet(nn.Module):
    def __init__(self, num_blocks: int, num_classes: int = 10, in_channels: int = 3):
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, 16, 3, stride=1, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(16)
        self.layer1 = self._make_layer(16, 16, num_blocks, stride=1)
        self.layer2 = self._make_layer(16, 32, num_blocks, stride=2)
        self.layer3 = self._make_layer(32, 64, num_blocks, stride=2)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.linear = nn.Linear(64, num_classes)
        for m in self.modules():
            if isinstance(m, (nn.Conv2d, nn.Linear)):
                nn.init.kaiming_normal_(m.weight)

    @staticmethod
    def _make_layer(in_planes: int, planes: int, n: int, stride: int) -> nn.Sequential:
        blocks = [BasicBlock(in_planes, planes, stride)]
        blocks += [BasicBlock(planes, planes, 1) for _ in range(n - 1)]
        return nn.Sequential(*blocks)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.layer3(self.layer2(self.layer1(out)))
        out = torch.flatten(self.avgpool(out), 1)
        return self.linear(out)


def cifar_resnet(name: str, num_classes: int = 10, in_channels: int = 3) -> CifarResNet:
    """Build ``resnet20``/``32``/``44``/``56``/``110`` (``KeyError`` for other names)."""
    return CifarResNet(DEPTHS[name], num_classes=num_classes, in_channels=in_channels)
