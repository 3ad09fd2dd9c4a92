"""A user model file, as a user would write one: MobileNetV1 at width 0.25 in the layout of the
ImageNet-pretrained ``mobilenetV1X0.25_pretrain.tar`` (biubug6's RetinaFace backbone).

Used as ``model.source: tests/models/mobilenet_v1_025.py:build``; it imports nothing from smcp.
"""

import torch.nn as nn


def _stem(cin, cout, stride):
    return nn.Sequential(nn.Conv2d(cin, cout, 3, stride, 1, bias=False), nn.BatchNorm2d(cout),
                         nn.LeakyReLU(0.1))


def _separable(cin, cout, stride):
    return nn.Sequential(
        nn.Conv2d(cin, cin, 3, stride, 1, groups=cin, bias=False), nn.BatchNorm2d(cin), nn.LeakyReLU(0.1),
        nn.Conv2d(cin, cout, 1, bias=False), nn.BatchNorm2d(cout), nn.LeakyReLU(0.1),
    )


class MobileNetV1x025(nn.Module):
    def __init__(self, num_classes=1000):
        super().__init__()
        self.stage1 = nn.Sequential(_stem(3, 8, 2), _separable(8, 16, 1), _separable(16, 32, 2),
                                    _separable(32, 32, 1), _separable(32, 64, 2), _separable(64, 64, 1))
        self.stage2 = nn.Sequential(_separable(64, 128, 2), *[_separable(128, 128, 1) for _ in range(5)])
        self.stage3 = nn.Sequential(_separable(128, 256, 2), _separable(256, 256, 1))
        self.avg = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(256, num_classes)

    def forward(self, x):
        x = self.avg(self.stage3(self.stage2(self.stage1(x))))
        return self.fc(x.flatten(1))


def build(num_classes=1000):
    return MobileNetV1x025(num_classes)
