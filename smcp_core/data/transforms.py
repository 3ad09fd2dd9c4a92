"""Small, picklable image transforms built on Pillow, numpy and torch (no torchvision needed).

Randomness comes from torch's global RNG, so ``torch.manual_seed`` (and the per-worker seeds a
``DataLoader`` sets) make augmentation reproducible.  They mirror torchvision's ``RandomCrop``
(zero padding), ``RandomHorizontalFlip``, ``RandomResizedCrop``, ``Resize`` (shorter side) and
``CenterCrop`` on PIL images.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def _uniform(a: float, b: float) -> float:
    return float(torch.empty(1).uniform_(a, b).item())


def _randint(low: int, high_exclusive: int) -> int:
    return int(torch.randint(low, high_exclusive, (1,)).item())


def pil_to_tensor(img: Image.Image) -> torch.Tensor:
    """PIL image -> float tensor CxHxW in [0, 1]."""
    arr = np.array(img, dtype=np.uint8)
    if arr.ndim == 2:
        arr = arr[:, :, None]
    return torch.from_numpy(arr).permute(2, 0, 1).float().div_(255.0)


def hwc_uint8_to_tensor(arr: np.ndarray) -> torch.Tensor:
    """uint8 HxWxC numpy array -> float tensor CxHxW in [0, 1]."""
    return torch.from_numpy(np.ascontiguousarray(arr)).permute(2, 0, 1).float().div_(255.0)


class Normalize:
    def __init__(self, mean: Sequence[float], std: Sequence[float]):
        self.mean = torch.tensor(mean, dtype=torch.float32).view(-1, 1, 1)
        self.std = torch.tensor(std, dtype=torch.float32).view(-1, 1, 1)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.mean) / self.std


class TensorResize:
    """Bilinear resize of a CxHxW tensor to ``size`` x ``size`` (no-op when already that size)."""

    def __init__(self, size: int):
        self.size = size

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-2:] == (self.size, self.size):
            return x
        return F.interpolate(x[None], size=(self.size, self.size), mode="bilinear", align_corners=False)[0]


class RandomCropPad:
    """Zero-pad a CxHxW tensor by ``padding`` on each side, then crop a random HxW window."""

    def __init__(self, padding: int):
        self.padding = padding

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        p = self.padding
        if p <= 0:
            return x
        h, w = x.shape[-2:]
        padded = F.pad(x, (p, p, p, p))
        i, j = _randint(0, 2 * p + 1), _randint(0, 2 * p + 1)
        return padded[:, i : i + h, j : j + w]


class RandomHFlip:
    def __init__(self, p: float = 0.5):
        self.p = p

    def __call__(self, x):
        if _uniform(0.0, 1.0) < self.p:
            if isinstance(x, Image.Image):
                return x.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
            return torch.flip(x, dims=(-1,))
        return x


class RandomResizedCrop:
    """torchvision's RandomResizedCrop on a PIL image (scale 0.08-1, ratio 3/4-4/3, bilinear)."""

    def __init__(self, size: int, scale=(0.08, 1.0), ratio=(3 / 4, 4 / 3)):
        self.size, self.scale, self.ratio = size, scale, ratio

    def params(self, width: int, height: int) -> tuple[int, int, int, int]:
        area = width * height
        log_ratio = (math.log(self.ratio[0]), math.log(self.ratio[1]))
        for _ in range(10):
            target_area = area * _uniform(*self.scale)
            aspect = math.exp(_uniform(*log_ratio))
            w = int(round(math.sqrt(target_area * aspect)))
            h = int(round(math.sqrt(target_area / aspect)))
            if 0 < w <= width and 0 < h <= height:
                return _randint(0, height - h + 1), _randint(0, width - w + 1), h, w
        in_ratio = width / height
        if in_ratio < min(self.ratio):
            w, h = width, int(round(width / min(self.ratio)))
        elif in_ratio > max(self.ratio):
            h, w = height, int(round(height * max(self.ratio)))
        else:
            w, h = width, height
        return (height - h) // 2, (width - w) // 2, h, w

    def __call__(self, img: Image.Image) -> Image.Image:
        i, j, h, w = self.params(*img.size)
        return img.resize((self.size, self.size), Image.Resampling.BILINEAR, box=(j, i, j + w, i + h))


class ResizeShorter:
    """Resize a PIL image so its shorter side is ``size`` (bilinear, antialiased like torchvision)."""

    def __init__(self, size: int):
        self.size = size

    def __call__(self, img: Image.Image) -> Image.Image:
        w, h = img.size
        short, long = (w, h) if w <= h else (h, w)
        if short == self.size:
            return img
        new_short, new_long = self.size, int(self.size * long / short)
        new_w, new_h = (new_short, new_long) if w <= h else (new_long, new_short)
        return img.resize((new_w, new_h), Image.Resampling.BILINEAR)


class CenterCrop:
    def __init__(self, size: int):
        self.size = size

    def __call__(self, img: Image.Image) -> Image.Image:
        w, h = img.size
        th = tw = self.size
        if w < tw or h < th:  # pad like torchvision, then crop
            canvas = Image.new(img.mode, (max(w, tw), max(h, th)))
            canvas.paste(img, ((max(w, tw) - w) // 2, (max(h, th) - h) // 2))
            img, (w, h) = canvas, canvas.size
        top = int(round((h - th) / 2.0))
        left = int(round((w - tw) / 2.0))
        return img.crop((left, top, left + tw, top + th))


class Compose:
    def __init__(self, steps: Sequence):
        self.steps = list(steps)

    def __call__(self, x):
        for step in self.steps:
            x = step(x)
        return x


def imagenet_train_transform(size: int, mean=IMAGENET_MEAN, std=IMAGENET_STD) -> Compose:
    """PIL image -> RandomResizedCrop(size) + flip -> normalised tensor."""
    return Compose([RandomResizedCrop(size), RandomHFlip(), pil_to_tensor, Normalize(mean, std)])


def imagenet_eval_transform(size: int, mean=IMAGENET_MEAN, std=IMAGENET_STD) -> Compose:
    """PIL image -> resize shorter side to int(size / 0.875) -> centre crop -> normalised tensor."""
    return Compose([ResizeShorter(int(size / 0.875)), CenterCrop(size), pil_to_tensor, Normalize(mean, std)])
