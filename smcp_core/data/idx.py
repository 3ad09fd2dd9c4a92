"""Reader for the idx files of MNIST and Fashion-MNIST (gzip-compressed or raw); never downloads.

idx layout: two zero bytes, a type byte (0x08 uint8, 0x09 int8, 0x0B int16, 0x0C int32, 0x0D float32,
0x0E float64), the number of dimensions, then one big-endian uint32 per dimension, then the data
(big-endian).

* :func:`read_idx` -- one file as a numpy array.
* :func:`load_idx_pair` -- images + labels as tensors: images ``float32 (N, 1, H, W)`` scaled to
  [0, 1] and standardised with ``mean``/``std`` when given; labels ``int64 (N,)``.
* :func:`load_mnist_like` -- a split (``"train"``/``"test"``) from a folder holding the standard file
  names (``train-images-idx3-ubyte[.gz]``, ``t10k-labels-idx1-ubyte[.gz]``, ...), standardised with
  the usual training-set statistics of the named dataset.

Every problem (missing file, bad header, truncated data, count mismatch) raises
:class:`~smcp_core.errors.SmcpError` with one line naming the file.
"""

from __future__ import annotations

import gzip
from pathlib import Path

import numpy as np
import torch

from smcp_core.errors import SmcpError

__all__ = [
    "read_idx",
    "load_idx_pair",
    "load_mnist_like",
    "DATASET_STATS",
    "DEBIAN_FASHION_MNIST",
]

#: (mean, std) of the training images scaled to [0, 1] -- the customary normalisation constants.
DATASET_STATS: dict[str, tuple[float, float]] = {
    "mnist": (0.1307, 0.3081),
    "fashion-mnist": (0.2860, 0.3530),
}

#: where Debian's ``dataset-fashion-mnist`` package installs the four idx files.
DEBIAN_FASHION_MNIST = Path("/usr/share/datasets/fashion-mnist")

_DTYPES = {
    0x08: np.dtype(np.uint8),
    0x09: np.dtype(np.int8),
    0x0B: np.dtype(">i2"),
    0x0C: np.dtype(">i4"),
    0x0D: np.dtype(">f4"),
    0x0E: np.dtype(">f8"),
}
_SPLIT_PREFIX = {"train": "train", "test": "t10k"}


def read_idx(path: str | Path) -> np.ndarray:
    """Parse one idx file (gzip detected from its first bytes, not its name) into a native-endian
    numpy array of the stored shape."""
    path = Path(path)
    if not path.is_file():
        raise SmcpError(f"idx file not found: {path}")
    try:
        raw = path.read_bytes()
        if raw[:2] == b"\x1f\x8b":
            raw = gzip.decompress(raw)
    except (OSError, EOFError) as e:
        raise SmcpError(f"cannot read idx file {path}: {e}") from None
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] not in _DTYPES:
        raise SmcpError(f"{path} is not an idx file (bad magic number {raw[:4].hex() or 'empty'})")
    dtype = _DTYPES[raw[2]]
    ndim = raw[3]
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise SmcpError(f"{path}: truncated idx header")
    dims = tuple(int(d) for d in np.frombuffer(raw, dtype=">u4", count=ndim, offset=4))
    count = int(np.prod(dims, dtype=np.int64)) if dims else 1
    need = header + count * dtype.itemsize
    if len(raw) != need:
        raise SmcpError(f"{path}: idx data has {len(raw) - header} bytes, the header {dims} says {need - header}")
    arr = np.frombuffer(raw, dtype=dtype, count=count, offset=header).reshape(dims)
    return arr.astype(dtype.newbyteorder("="), copy=True)


def load_idx_pair(
    images_path: str | Path,
    labels_path: str | Path,
    *,
    mean: float | None = None,
    std: float | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Images ``float32 (N, 1, H, W)`` in [0, 1] (then ``(x - mean) / std`` when both are given) and
    labels ``int64 (N,)``."""
    images = read_idx(images_path)
    labels = read_idx(labels_path)
    if images.ndim != 3:
        raise SmcpError(f"{images_path}: expected images of shape (N, H, W), got {images.shape}")
    if labels.ndim != 1:
        raise SmcpError(f"{labels_path}: expected labels of shape (N,), got {labels.shape}")
    if len(images) != len(labels):
        raise SmcpError(f"{images_path} has {len(images)} images but {labels_path} has {len(labels)} labels")
    x = torch.from_numpy(images.astype(np.float32))
    if images.dtype == np.uint8:
        x = x / 255.0
    x = x.unsqueeze(1).contiguous()
    if (mean is None) != (std is None):
        raise SmcpError("give both mean and std, or neither")
    if mean is not None:
        if not std > 0:
            raise SmcpError(f"std must be > 0, got {std}")
        x = (x - float(mean)) / float(std)
    y = torch.from_numpy(labels.astype(np.int64))
    return x, y


def _find(root: Path, stem: str) -> Path:
    for name in (stem + ".gz", stem):
        if (root / name).is_file():
            return root / name
    raise SmcpError(f"{stem}[.gz] not found in {root}")


def load_mnist_like(
    root: str | Path,
    split: str = "test",
    *,
    dataset: str = "mnist",
    normalize: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Load ``split`` (``"train"`` or ``"test"``) of MNIST or Fashion-MNIST from ``root``.

    ``dataset`` (``"mnist"`` or ``"fashion-mnist"``) only picks the normalisation constants
    (:data:`DATASET_STATS`); ``normalize=False`` returns images in [0, 1].
    """
    if split not in _SPLIT_PREFIX:
        raise SmcpError(f"split must be 'train' or 'test', got {split!r}")
    if dataset not in DATASET_STATS:
        raise SmcpError(f"dataset must be one of {sorted(DATASET_STATS)}, got {dataset!r}")
    root = Path(root)
    if not root.is_dir():
        raise SmcpError(f"{dataset} folder not found: {root}")
    prefix = _SPLIT_PREFIX[split]
    img = _find(root, f"{prefix}-images-idx3-ubyte")
    lab = _find(root, f"{prefix}-labels-idx1-ubyte")
    mean, std = DATASET_STATS[dataset] if normalize else (None, None)
    return load_idx_pair(img, lab, mean=mean, std=std)
