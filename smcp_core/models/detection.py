"""Detectors for the Python API: an SSD with a ResNet-50 backbone, and the part of a torchvision
single-stage detector that is deployed (and pruned).

* :func:`ssd_resnet50` builds torchvision's :class:`~torchvision.models.detection.SSD` on a
  ResNet-50 trunk in the shape of the SSD-RN50 of the SMCP paper: ResNet-50 up to ``layer3`` with
  the stride of ``layer3`` removed (features at 1/8 of the input, 1024 channels), then five extra
  blocks (1x1 conv to a narrower width, 3x3 stride-2 conv; batch norm and ReLU after each) giving
  512, 512, 256, 256 and 256 channels, one SSD head per feature map.  The input size is a parameter
  (the paper's is 512; 300 is the common one).
* :class:`DetectorCore` is ``backbone + head`` of a torchvision ``SSD``/``SSDlite``/``RetinaNet``
  (anything with ``.backbone`` returning a dict of features and ``.head`` taking their list and returning
  ``bbox_regression`` and ``cls_logits``) on an
  already normalised image batch, returning one tensor ``(N, anchors, 4 + classes)``: box
  regression and class logits.  That is the graph a detector deploys (anchor decoding and NMS
  follow it and do not change with pruning): it is what smcp traces, times, slims and exports,
  while training runs the detector's own ``forward(images, targets)`` with its own loss on the
  same modules.
"""

from __future__ import annotations

from collections import OrderedDict

import torch
from torch import nn

from smcp_core.errors import SmcpError
from smcp_core.utils.tv import import_torchvision

EXTRA_WIDTHS = ((256, 512), (256, 512), (128, 256), (128, 256), (128, 256))  # (1x1 width, output) per block


class ResNet50SSDBackbone(nn.Module):
    """ResNet-50 to ``layer3`` at stride 8, plus the five extra blocks; returns the six feature
    maps as an ordered dict ``{"0": ..., "5": ...}``."""

    def __init__(self) -> None:
        super().__init__()
        tv = import_torchvision()
        r = tv.models.resnet50(weights=None)
        r.layer3[0].conv2.stride = (1, 1)  # layer3 stays at 1/8: the 38x38 map of SSD300
        r.layer3[0].downsample[0].stride = (1, 1)
        self.body = nn.Sequential(r.conv1, r.bn1, r.relu, r.maxpool, r.layer1, r.layer2, r.layer3)
        blocks, cin = [], 1024
        for mid, cout in EXTRA_WIDTHS:
            blocks.append(nn.Sequential(
                nn.Conv2d(cin, mid, 1, bias=False), nn.BatchNorm2d(mid), nn.ReLU(inplace=True),
                nn.Conv2d(mid, cout, 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True)))
            cin = cout
        self.extra = nn.ModuleList(blocks)
        self.out_channels = [1024] + [c for _, c in EXTRA_WIDTHS]

    def forward(self, x: torch.Tensor) -> OrderedDict[str, torch.Tensor]:
        x = self.body(x)
        feats = [x]
        for block in self.extra:
            x = block(x)
            feats.append(x)
        return OrderedDict((str(i), f) for i, f in enumerate(feats))


def ssd_resnet50(*, size: int = 300, num_classes: int = 21) -> nn.Module:
    """torchvision's ``SSD`` on :class:`ResNet50SSDBackbone` at ``size`` x ``size`` pixels
    (``num_classes`` counts the background), random weights (nothing is downloaded)."""
    if size < 64:
        raise SmcpError(f"ssd_resnet50: size {size} is too small; use at least 64 pixels (the paper uses 512)")
    tv = import_torchvision()
    det = tv.models.detection
    anchors = det.anchor_utils.DefaultBoxGenerator([[2], [2, 3], [2, 3], [2, 3], [2], [2]])
    return det.ssd.SSD(ResNet50SSDBackbone(), anchors, (size, size), num_classes,
                       image_mean=[0.485, 0.456, 0.406], image_std=[0.229, 0.224, 0.225])


class DetectorCore(nn.Module):
    """``backbone + head`` of ``detector`` on a normalised batch (see the module docstring); the
    modules are the detector's own, so masks and slimming apply to both."""

    def __init__(self, detector: nn.Module) -> None:
        super().__init__()
        if not (hasattr(detector, "backbone") and hasattr(detector, "head")):
            raise SmcpError(f"{type(detector).__name__} has no .backbone and .head; DetectorCore takes a torchvision "
                            "single-stage detector (SSD, SSDlite, RetinaNet)")
        self.backbone = detector.backbone
        self.head = detector.head

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.head(list(self.backbone(x).values()))
        return torch.cat([out["bbox_regression"], out["cls_logits"]], dim=2)

    def put_into(self, detector: nn.Module) -> nn.Module:
        """``detector`` with this core's (slimmed) backbone and head in place of its own."""
        detector.backbone = self.backbone
        detector.head = self.head
        return detector
