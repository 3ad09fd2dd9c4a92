"""A generated detection data set: coloured rectangles, ellipses and triangles on a noisy
background, with their boxes and classes.  Used where no real detection set can be installed
(no download here); it says nothing about accuracy on natural images.

Each image holds 1 to ``max_objects`` shapes of 1/6 to 1/2 of the image side, drawn over each
other in order; the box is the shape's bounding box (also where it is partly hidden).  Classes:
1 rectangle, 2 ellipse, 3 triangle (0 is the background, as torchvision's detectors count).
Deterministic for a given ``seed``.
"""

from __future__ import annotations

import torch

CLASSES = ("background", "rectangle", "ellipse", "triangle")


def _shape_mask(kind: int, x0: float, y0: float, w: float, h: float, yy: torch.Tensor,
                xx: torch.Tensor) -> torch.Tensor:
    u, v = (xx - x0) / w, (yy - y0) / h  # 0..1 inside the box
    inside = (u >= 0) & (u <= 1) & (v >= 0) & (v <= 1)
    if kind == 1:
        return inside
    if kind == 2:
        return (u - 0.5) ** 2 + (v - 0.5) ** 2 <= 0.25
    return inside & (v >= 2 * (u - 0.5).abs())  # apex at the top centre, base along the bottom


def shapes_dataset(n: int, *, size: int = 128, seed: int = 0, max_objects: int = 3) -> list[tuple[torch.Tensor, dict]]:
    """``n`` samples ``(image, target)``: a float image ``3 x size x size`` in [0, 1] and a target
    ``{"boxes": (k, 4) float xyxy pixels, "labels": (k,) int64}`` as torchvision's detectors take."""
    g = torch.Generator().manual_seed(seed)
    yy, xx = torch.meshgrid(torch.arange(size, dtype=torch.float32) + 0.5,
                            torch.arange(size, dtype=torch.float32) + 0.5, indexing="ij")
    out = []
    for _ in range(n):
        img = 0.35 + 0.15 * torch.rand(3, 1, 1, generator=g) + 0.08 * torch.randn(3, size, size, generator=g)
        boxes, labels = [], []
        for _ in range(int(torch.randint(1, max_objects + 1, (1,), generator=g))):
            kind = int(torch.randint(1, 4, (1,), generator=g))
            w, h = ((torch.rand(2, generator=g) * (1 / 2 - 1 / 6) + 1 / 6) * size).tolist()
            x0 = float(torch.rand(1, generator=g)) * (size - w)
            y0 = float(torch.rand(1, generator=g)) * (size - h)
            colour = torch.rand(3, 1, 1, generator=g)
            mask = _shape_mask(kind, x0, y0, w, h, yy, xx)
            img = torch.where(mask, colour.expand(3, size, size), img)
            boxes.append([x0, y0, x0 + w, y0 + h])
            labels.append(kind)
        out.append((img.clamp(0, 1), {"boxes": torch.tensor(boxes, dtype=torch.float32),
                                      "labels": torch.tensor(labels, dtype=torch.int64)}))
    return out
