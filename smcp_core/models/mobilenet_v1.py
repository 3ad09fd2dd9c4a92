"""MobileNetV1 (Howard et al. 2017) in the layout of biubug6's RetinaFace backbone.

``stage1`` = conv_bn stem + 5 depthwise-separable blocks, ``stage2`` = 6 blocks, ``stage3`` = 2
blocks, then ``avg`` (global average pooling) and ``fc``.  Activations are LeakyReLU(0.1), as in
that checkpoint.  With ``width=0.25`` the channel counts are 8,16,32,32,64,64 | 128x6 | 256,256,
which is what ``mobilenetV1X0.25_pretrain.tar`` holds (keys ``stage1.1.0.weight`` = depthwise,
``stage1.1.3.weight`` = pointwise).
"""

from __future__ import annotations

import torch
from torch import nn

# (output channels at width 1.0, stride) per layer; the first entry is the 3x3 stem conv.
_STAGE1 = [(32, 2), (64, 1), (128, 2), (128, 1), (256, 2), (256, 1)]
_STAGE2 = [(512, 2)] + [(512, 1)] * 5
_STAGE3 = [(1024, 2), (1024, 1)]


def _ch(c: int, width: float) -> int:
    return max(1, int(round(c * width)))


def conv_bn(inp: int, oup: int, stride: int = 1, leaky: float = 0.1) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(inp, oup, 3, stride, 1, bias=False),
        nn.BatchNorm2d(oup),
        nn.LeakyReLU(negative_slope=leaky, inplace=False),
    )


def conv_dw(inp: int, oup: int, stride: int, leaky: float = 0.1) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(inp, inp, 3, stride, 1, groups=inp, bias=False),
        nn.BatchNorm2d(inp),
        nn.LeakyReLU(negative_slope=leaky, inplace=False),
        nn.Conv2d(inp, oup, 1, 1, 0, bias=False),
        nn.BatchNorm2d(oup),
        nn.LeakyReLU(negative_slope=leaky, inplace=False),
    )


class MobileNetV1(nn.Module):
    def __init__(self, width: float = 1.0, num_classes: int = 1000, in_channels: int = 3):
        super().__init__()
        if not width > 0:
            raise ValueError(f"width must be > 0 (got {width})")
        c_prev = _ch(_STAGE1[0][0], width)
        layers1: list[nn.Module] = [conv_bn(in_channels, c_prev, _STAGE1[0][1])]
        for c, s in _STAGE1[1:]:
            layers1.append(conv_dw(c_prev, _ch(c, width), s))
            c_prev = _ch(c, width)
        layers2: list[nn.Module] = []
        for c, s in _STAGE2:
            layers2.append(conv_dw(c_prev, _ch(c, width), s))
            c_prev = _ch(c, width)
        layers3: list[nn.Module] = []
        for c, s in _STAGE3:
            layers3.append(conv_dw(c_prev, _ch(c, width), s))
            c_prev = _ch(c, width)
        self.stage1 = nn.Sequential(*layers1)
        self.stage2 = nn.Sequential(*layers2)
        self.stage3 = nn.Sequential(*layers3)
        self.avg = nn.AdaptiveAvgPool2d((1, 1))
        self.fc = nn.Linear(c_prev, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="leaky_relu", a=0.1)
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, 0, 0.01)
                nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stage3(self.stage2(self.stage1(x)))
        x = torch.flatten(self.avg(x), 1)
        return self.fc(x)
