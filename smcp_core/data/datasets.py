"""Map-style datasets used by the data registry.

Every dataset yields ``(float tensor CxHxW, int label)``, exposes ``labels`` (numpy int64, one per
item) and takes an ``indices`` array selecting which underlying items it shows (subsets, splits).
Images are decoded lazily in ``__getitem__``, so building a dataset is cheap.
"""

from __future__ import annotations

import io
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, UnidentifiedImageError
from torch.utils.data import Dataset

from smcp_core.data.transforms import hwc_uint8_to_tensor
from smcp_core.errors import SmcpError


class DataError(SmcpError):
    """An :class:`SmcpError` raised while reading an item.  A DataLoader worker process hands it back
    as ``DataError("Caught DataError in DataLoader worker process N.\\nOriginal Traceback ...")``;
    this constructor keeps the original one-line message (and which worker) instead of the whole
    traceback."""

    def __init__(self, message: str = "", *args):
        text = str(message)
        if text.startswith("Caught ") and "\nOriginal Traceback" in text:
            where = text.split("\n", 1)[0].rstrip(".")
            where = where.split(" in ", 1)[1] if " in " in where else "a worker"
            lines = [ln for ln in text.splitlines() if ln.strip()]
            last = lines[-1] if lines else ""
            name = type(self).__name__ + ": "
            original = last.split(name, 1)[1] if name in last else last
            text = f"{original} (in {where})"
        super().__init__(text, *args)


class _Indexed(Dataset):
    def __init__(self, labels: np.ndarray, indices: np.ndarray | None, transform: Callable | None):
        all_labels = np.asarray(labels, dtype=np.int64)
        self.indices = np.arange(len(all_labels)) if indices is None else np.asarray(indices, dtype=np.int64)
        self.labels = all_labels[self.indices]
        self.transform = transform

    def __len__(self) -> int:
        return len(self.indices)

    def _raw(self, k: int):  # pragma: no cover - abstract
        raise NotImplementedError

    def __getitem__(self, i: int):
        if i < 0:
            i += len(self)
        x = self._raw(int(self.indices[i]))
        if self.transform is not None:
            x = self.transform(x)
        return x, int(self.labels[i])


class TensorImages(_Indexed):
    """Images held in memory as a float tensor NxCxHxW (values before normalisation)."""

    def __init__(self, images: torch.Tensor, labels, indices=None, transform=None):
        super().__init__(labels, indices, transform)
        self.images = images

    def _raw(self, k: int) -> torch.Tensor:
        return self.images[k]


class UInt8HWCImages(_Indexed):
    """Images held as a uint8 NxHxWxC numpy array; ``_raw`` gives a float CxHxW tensor in [0, 1]."""

    def __init__(self, images: np.ndarray, labels, indices=None, transform=None):
        super().__init__(labels, indices, transform)
        self.images = images

    def _raw(self, k: int) -> torch.Tensor:
        return hwc_uint8_to_tensor(self.images[k])


class JpegBlob(_Indexed):
    """JPEG files concatenated in one uint8 array: item k is ``blob[offsets[k]:offsets[k+1]]``.

    ``as_tensor=True`` gives a float CxHxW tensor in [0, 1]; otherwise the PIL RGB image.
    """

    def __init__(self, blob: np.ndarray, offsets: np.ndarray, labels, indices=None, transform=None,
                 as_tensor: bool = True, origin: str = ""):
        super().__init__(labels, indices, transform)
        self.blob, self.offsets, self.as_tensor, self.origin = blob, offsets, as_tensor, origin

    def _raw(self, k: int):
        data = self.blob[int(self.offsets[k]) : int(self.offsets[k + 1])].tobytes()
        try:
            img = Image.open(io.BytesIO(data)).convert("RGB")
        except (UnidentifiedImageError, OSError) as exc:
            raise DataError(f"{self.origin}: image {k} cannot be decoded ({_first_line(exc)})") from None
        if self.as_tensor:
            return hwc_uint8_to_tensor(np.array(img, dtype=np.uint8))
        return img


class ImageFiles(_Indexed):
    """Image files on disk, loaded with Pillow as RGB PIL images."""

    def __init__(self, files: Sequence[str], labels, indices=None, transform=None):
        super().__init__(labels, indices, transform)
        self.files = list(files)

    def _raw(self, k: int) -> Image.Image:
        path = self.files[k]
        try:
            with Image.open(path) as img:
                return img.convert("RGB")
        except (UnidentifiedImageError, OSError) as exc:
            raise DataError(f"image {path} cannot be read ({_first_line(exc)}); remove or replace the file") from None


class SyntheticImages(_Indexed):
    """Deterministic random images: item k is ``N(0, 1)`` noise (seeded by ``seed`` and k) plus a
    smooth per-class pattern, so a model can learn something from it.  ``offset`` separates the
    train and val streams."""

    def __init__(self, n: int, num_classes: int, shape: tuple[int, int, int], seed: int,
                 offset: int = 0, indices=None, transform=None):
        rng = np.random.default_rng(seed)
        self.all_labels = rng.integers(0, num_classes, size=n + offset)[offset:].astype(np.int64)
        super().__init__(self.all_labels, indices, transform)
        g = torch.Generator().manual_seed(seed)
        self.prototypes = torch.randn(num_classes, shape[0], 4, 4, generator=g)
        self.shape, self.seed, self.offset = tuple(shape), seed, offset

    def _raw(self, k: int) -> torch.Tensor:
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + self.offset + k + 1)
        noise = torch.randn(self.shape, generator=g)
        proto = self.prototypes[int(self.all_labels[k])][None]
        pattern = F.interpolate(proto, size=self.shape[1:], mode="bilinear", align_corners=False)[0]
        return noise + pattern


def _first_line(exc: BaseException) -> str:
    lines = str(exc).strip().splitlines()
    return lines[0] if lines else type(exc).__name__


def image_files(root: Path, exts: tuple[str, ...]) -> list[Path]:
    return sorted(p for p in root.rglob("*") if p.is_file() and p.suffix.lower() in exts)
