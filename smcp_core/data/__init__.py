"""Data registry: turn a source name + options into train/val datasets.

:func:`build_data` sources (``path`` is resolved against ``base_dir`` when relative):

* ``digits`` — scikit-learn's bundled 8x8 handwritten digits (1797 images, no download), upsampled
  once to ``image_size`` (default 32), 1 channel, seeded stratified 80/20 train/val split; train
  augmentation: random shift of up to 2 pixels.  ``path`` is not used.
* ``cifar10`` — ``path`` is one of the two npz layouts (detected by their keys):
  ``cifar10_exact_subset.npz`` (train 5085 / val 1017 exact images) or ``cifar10_jpeg.npz``
  (train 50,000 / val 10,000 JPEG images, decoded lazily).  ImageNet normalisation; train
  augmentation: random crop 32 with padding 4 + horizontal flip.
* ``imagefolder`` — ``path`` has ``train/`` and ``val/``, each with one sub-folder per class (at
  least two; an empty class folder in ``train/`` is an error, not a class; :func:`class_count` gives
  the count that the model's ``num_classes`` defaults to).
  Train: RandomResizedCrop(image_size) + flip; val: resize to int(image_size / 0.875), centre crop.
  ``image_size`` defaults to 224.  ImageNet normalisation.
* ``imagenet_samples`` — ``path`` is ``imagenet_samples_100.npz`` (or its folder): 100 ImageNet
  validation-style images; val-only (train = the same images, never augmented); resize 256 /
  centre-crop 224 at the default image_size; 1000 classes.
* ``synthetic`` — deterministic random images (``input_shape`` default (3, 32, 32), ``image_size``
  overrides H and W; ``num_classes`` default 10; 256 train / 64 val items unless subset sizes say
  otherwise).

Evaluating on a different file: ``val_path`` (and optionally ``val_source``, default ``source``)
builds the validation set from another source/path, e.g. train on ``cifar10_jpeg.npz`` and
validate on ``cifar10_exact_subset.npz``::

    build_data("cifar10", path=".../cifar10_jpeg.npz", val_path=".../cifar10_exact_subset.npz")

Labels and indices stored in an npz must be integers (whole-valued floats are accepted) inside
their range (class indices 0..9 for cifar10, 0..999 for imagenet_samples; indices and offsets within
the arrays they point into); anything else is one line naming the file and the key.

Subsets: ``train_subset`` takes the first N training items after a shuffle seeded by ``seed``;
``val_subset`` takes the first N validation items (no shuffle).  Sizes larger than the set are
clamped.  Every bad input raises :class:`~smcp_core.errors.SmcpError`.
"""

from __future__ import annotations

import random
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset

from smcp_core.data.datasets import (
    ImageFiles,
    JpegBlob,
    SyntheticImages,
    TensorImages,
    UInt8HWCImages,
    image_files,
)
from smcp_core.data.transforms import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    Compose,
    Normalize,
    RandomCropPad,
    RandomHFlip,
    TensorResize,
    imagenet_eval_transform,
    imagenet_train_transform,
)
from smcp_core.errors import SmcpError
from smcp_core.utils import dist as _dist

__all__ = [
    "DataBundle",
    "build_data",
    "class_count",
    "make_loader",
    "list_sources",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
]

SOURCES = ("digits", "cifar10", "imagefolder", "imagenet_samples", "synthetic")
IMAGE_EXTS = (".jpg", ".jpeg", ".png", ".bmp", ".ppm", ".pgm", ".gif", ".tif", ".tiff", ".webp")


@dataclass
class DataBundle:
    train: Dataset  # yields (float tensor CxHxW normalised, int label)
    val: Dataset | None
    num_classes: int
    input_shape: tuple[int, int, int]  # C, H, W
    mean: tuple[float, ...]
    std: tuple[float, ...]
    description: str  # one line, for logs/reports
    class_names: list[str] | None = field(default=None)


def list_sources() -> list[str]:
    return list(SOURCES)


# ------------------------------------------------------------------------------------------ helpers


def _check_pos_int(name: str, value, source: str) -> int | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise SmcpError(f"data {source}: {name} must be a positive integer (got {value!r})")
    return int(value)


def _resolve(path, base_dir) -> Path:
    p = Path(path).expanduser()
    if not p.is_absolute() and base_dir is not None:
        p = Path(base_dir) / p
    return p


def _require_path(source: str, path, base_dir) -> Path:
    if path is None or str(path).strip() == "":
        raise SmcpError(f"data {source}: needs a path (data.path in the recipe)")
    p = _resolve(path, base_dir)
    if not p.exists():
        raise SmcpError(f"data {source}: path {p} not found; check data.path")
    return p


def _load_npz(source: str, p: Path) -> dict:
    try:
        with np.load(p, allow_pickle=False) as z:
            return {k: z[k] for k in z.files}
    except (ValueError, OSError, zipfile.BadZipFile, EOFError) as exc:
        raise SmcpError(f"data {source}: {p} is not a readable .npz file ({type(exc).__name__}: {exc})") from None


def _need_keys(source: str, p: Path, arrays: dict, keys: tuple[str, ...]) -> None:
    missing = [k for k in keys if k not in arrays]
    if missing:
        raise SmcpError(f"data {source}: {p} lacks keys {', '.join(missing)} (has {', '.join(sorted(arrays))})")


def _int_array(source: str, p: Path, arrays: dict, key: str, lo: int, hi: int, what: str,
               values: np.ndarray | None = None) -> np.ndarray:
    """``arrays[key]`` (or ``values`` taken from it) as int64, refusing what a cast would silently
    change: fractional or non-finite numbers, and values outside ``[lo, hi)`` (a negative index
    would wrap around, a label past the last class would fail deep inside the loss)."""
    a = np.asarray(arrays[key] if values is None else values)
    if a.ndim != 1:
        raise SmcpError(f"data {source}: {p} key {key} must be a 1-D array of {what} (got shape {a.shape})")
    if a.dtype.kind == "b" or a.dtype.kind not in "iuf":
        raise SmcpError(f"data {source}: {p} key {key} must hold integer {what} (got dtype {a.dtype})")
    if a.dtype.kind == "f":
        bad = ~np.isfinite(a) | (a != np.round(a))
        if bad.any():
            k = int(np.argmax(bad))
            raise SmcpError(f"data {source}: {p} key {key} must hold integer {what}, but item {k} is {a[k]!r} "
                            f"(dtype {a.dtype}); store them as integers")
    if a.size:
        mn, mx = int(a.min()), int(a.max())
        if mn < lo or mx >= hi:
            raise SmcpError(f"data {source}: {p} key {key} has {what} outside the range {lo}..{hi - 1} "
                            f"(min {mn}, max {mx})")
    return a.astype(np.int64)


def _check_offsets(source: str, p: Path, arrays: dict, key: str, blob_key: str) -> None:
    """Offsets into a byte blob: integers from 0 to len(blob), never decreasing."""
    blob = np.asarray(arrays[blob_key])
    if blob.ndim != 1:
        raise SmcpError(f"data {source}: {p} key {blob_key} must be a 1-D uint8 array (got shape {blob.shape})")
    off = _int_array(source, p, arrays, key, 0, len(blob) + 1, f"offsets into {blob_key}")
    if np.any(np.diff(off) < 0):
        raise SmcpError(f"data {source}: {p} key {key} must never decrease (offsets into {blob_key})")


def _train_indices(n: int, subset: int | None, seed: int) -> np.ndarray | None:
    if subset is None or subset >= n:
        return None
    return np.random.default_rng(seed).permutation(n)[:subset]


def _val_indices(n: int, subset: int | None) -> np.ndarray | None:
    if subset is None or subset >= n:
        return None
    return np.arange(subset)


def _names(arrays: dict) -> list[str] | None:
    if "label_names" in arrays:
        return [str(x) for x in arrays["label_names"].tolist()]
    return None


# ------------------------------------------------------------------------------------------ sources


def _digits(image_size, train_subset, val_subset, seed, augment) -> DataBundle:
    from sklearn.datasets import load_digits

    size = image_size or 32
    d = load_digits()
    x = torch.from_numpy(d.images.astype(np.float32) / 16.0)[:, None]  # N,1,8,8 in [0, 1]
    if size != 8:
        x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False)
    y = d.target.astype(np.int64)
    mean, std = (float(x.mean()),), (float(x.std()),)
    # seeded stratified 80/20 split
    rng = np.random.default_rng(seed)
    train_idx, val_idx = [], []
    for c in range(10):
        idx = rng.permutation(np.nonzero(y == c)[0])
        n_val = int(round(0.2 * len(idx)))
        val_idx.append(idx[:n_val])
        train_idx.append(idx[n_val:])
    train_idx = rng.permutation(np.concatenate(train_idx))
    val_idx = np.sort(np.concatenate(val_idx))
    if train_subset is not None:
        train_idx = train_idx[:train_subset]
    if val_subset is not None:
        val_idx = val_idx[:val_subset]
    norm = Normalize(mean, std)
    train_tf = Compose([RandomCropPad(2), norm]) if augment else norm
    train = TensorImages(x, y, train_idx, train_tf)
    val = TensorImages(x, y, val_idx, norm)
    return DataBundle(
        train, val, 10, (1, size, size), mean, std,
        f"digits (scikit-learn, 8x8 upsampled to {size}x{size}): {len(train)} train / {len(val)} val, 10 classes",
        [str(i) for i in range(10)],
    )


def _cifar10(p: Path, image_size, train_subset, val_subset, seed, augment) -> DataBundle:
    src = "cifar10"
    if p.is_dir():
        found = sorted(q.name for q in p.glob("*.npz"))
        raise SmcpError(
            f"data cifar10: path {p} is a folder; point data.path at one .npz file"
            + (f" (found: {', '.join(found)})" if found else " (no .npz files there)")
        )
    arrays = _load_npz(src, p)
    size = image_size or 32
    post = [TensorResize(size)] if size != 32 else []
    norm = Normalize(IMAGENET_MEAN, IMAGENET_STD)
    train_tf = Compose(([RandomCropPad(4), RandomHFlip()] if augment else []) + post + [norm])
    val_tf = Compose(post + [norm])
    if "train_x" in arrays or "test_x" in arrays:
        _need_keys(src, p, arrays, ("train_x", "train_idx", "train_y_all", "test_x", "test_idx", "test_y_all"))
        for k in ("train_x", "test_x"):
            if arrays[k].ndim != 4 or arrays[k].shape[1:] != (32, 32, 3) or arrays[k].dtype != np.uint8:
                raise SmcpError(f"data cifar10: {p} key {k} must be uint8 Nx32x32x3 "
                                f"(got {arrays[k].dtype} {arrays[k].shape})")
        ys = {}
        for split in ("train", "test"):
            n_all = len(np.atleast_1d(arrays[f"{split}_y_all"]))
            idx = _int_array(src, p, arrays, f"{split}_idx", 0, n_all, f"indices into {split}_y_all")
            if len(idx) != len(arrays[f"{split}_x"]):
                raise SmcpError(f"data cifar10: {p}: {split}_idx has {len(idx)} entries but {split}_x holds "
                                f"{len(arrays[f'{split}_x'])} images; they must match")
            y_all = arrays[f"{split}_y_all"]
            ys[split] = _int_array(src, p, arrays, f"{split}_y_all", 0, 10, "labels (class indices)",
                                   values=np.asarray(y_all)[idx] if np.ndim(y_all) == 1 else y_all)
        tr_y, te_y = ys["train"], ys["test"]
        train = UInt8HWCImages(arrays["train_x"], tr_y, _train_indices(len(tr_y), train_subset, seed), train_tf)
        val = UInt8HWCImages(arrays["test_x"], te_y, _val_indices(len(te_y), val_subset), val_tf)
        layout = "exact-subset npz"
    elif "train_jpeg" in arrays or "test_jpeg" in arrays:
        _need_keys(src, p, arrays, ("train_jpeg", "train_offsets", "train_y", "test_jpeg", "test_offsets", "test_y"))
        for split in ("train", "test"):
            if len(arrays[f"{split}_offsets"]) != len(arrays[f"{split}_y"]) + 1:
                raise SmcpError(f"data cifar10: {p}: {split}_offsets must have len({split}_y)+1 entries")
            _check_offsets(src, p, arrays, f"{split}_offsets", f"{split}_jpeg")
        tr_y = _int_array(src, p, arrays, "train_y", 0, 10, "labels (class indices)")
        te_y = _int_array(src, p, arrays, "test_y", 0, 10, "labels (class indices)")
        train = JpegBlob(arrays["train_jpeg"], arrays["train_offsets"], tr_y,
                         _train_indices(len(tr_y), train_subset, seed), train_tf, origin=f"{p} train")
        val = JpegBlob(arrays["test_jpeg"], arrays["test_offsets"], te_y,
                       _val_indices(len(te_y), val_subset), val_tf, origin=f"{p} test")
        layout = "JPEG npz"
    else:
        raise SmcpError(
            f"data cifar10: {p} has neither the exact-subset keys (train_x, test_x, ...) nor the JPEG keys "
            f"(train_jpeg, train_offsets, ...); found: {', '.join(sorted(arrays)) or '(none)'}"
        )
    return DataBundle(
        train, val, 10, (3, size, size), IMAGENET_MEAN, IMAGENET_STD,
        f"cifar10 ({layout} {p.name}): {len(train)} train / {len(val)} val, 10 classes, 3x{size}x{size}",
        _names(arrays),
    )


def _imagefolder_splits(p: Path) -> dict[str, Path]:
    if not p.is_dir():
        raise SmcpError(f"data imagefolder: path {p} is not a folder; it must contain train/ and val/")
    splits = {}
    for split in ("train", "val"):
        d = p / split
        if not d.is_dir():
            raise SmcpError(f"data imagefolder: {d} not found; {p} must contain train/ and val/ "
                            "with one sub-folder per class")
        splits[split] = d
    return splits


def _has_image(d: Path) -> bool:
    return any(q.is_file() and q.suffix.lower() in IMAGE_EXTS for q in d.rglob("*"))


def _imagefolder_classes(train_dir: Path) -> list[str]:
    """The class folders of ``train/`` (sorted; hidden ones skipped).  An empty class folder is an
    error, not a class: it would be an output the model never sees trained."""
    classes = sorted(q.name for q in train_dir.iterdir() if q.is_dir() and not q.name.startswith("."))
    if not classes:
        raise SmcpError(f"data imagefolder: {train_dir} has no class sub-folders")
    empty = [c for c in classes if not _has_image(train_dir / c)]
    if empty:
        more = f" (and {len(empty) - 1} more: {', '.join(empty[1:4])})" if len(empty) > 1 else ""
        raise SmcpError(f"data imagefolder: class folder {train_dir / empty[0]} has no images "
                        f"({', '.join(IMAGE_EXTS[:4])}, ...){more}; add images or remove the folder")
    if len(classes) < 2:
        raise SmcpError(f"data imagefolder: {train_dir} has only one class folder ({classes[0]}); "
                        "classification needs at least two")
    return classes


def class_count(source: str, path: str | Path | None = None, base_dir: str | Path | None = None) -> int | None:
    """How many classes ``source`` has, without building the datasets: 10 (digits, cifar10), 1000
    (imagenet_samples), the class folders of ``path/train`` (imagefolder), None for synthetic (its
    ``num_classes`` is chosen, default 10).  The model's ``num_classes`` when the recipe leaves it out."""
    if source == "imagefolder":
        return len(_imagefolder_classes(_imagefolder_splits(_require_path(source, path, base_dir))["train"]))
    return {"digits": 10, "cifar10": 10, "imagenet_samples": 1000}.get(source)


def _imagefolder(p: Path, image_size, train_subset, val_subset, seed, augment) -> DataBundle:
    size = image_size or 224
    splits = _imagefolder_splits(p)
    classes = _imagefolder_classes(splits["train"])
    class_idx = {c: i for i, c in enumerate(classes)}
    val_classes = sorted(q.name for q in splits["val"].iterdir() if q.is_dir() and not q.name.startswith("."))
    extra = [c for c in val_classes if c not in class_idx]
    if extra:
        raise SmcpError(
            f"data imagefolder: {splits['val']} has classes missing from train/: {', '.join(extra[:5])}; "
            f"val/ must use the same class folder names"
        )
    data = {}
    for split, d in splits.items():
        files, labels = [], []
        for c in (classes if split == "train" else val_classes):
            fs = image_files(d / c, IMAGE_EXTS)
            files += [str(f) for f in fs]
            labels += [class_idx[c]] * len(fs)
        if not files:
            raise SmcpError(f"data imagefolder: no images ({', '.join(IMAGE_EXTS[:4])}, ...) under {d}")
        data[split] = (files, np.asarray(labels, dtype=np.int64))
    train_tf = imagenet_train_transform(size) if augment else imagenet_eval_transform(size)
    tr_files, tr_y = data["train"]
    va_files, va_y = data["val"]
    train = ImageFiles(tr_files, tr_y, _train_indices(len(tr_y), train_subset, seed), train_tf)
    val = ImageFiles(va_files, va_y, _val_indices(len(va_y), val_subset), imagenet_eval_transform(size))
    return DataBundle(
        train, val, len(classes), (3, size, size), IMAGENET_MEAN, IMAGENET_STD,
        f"imagefolder {p}: {len(train)} train / {len(val)} val, {len(classes)} classes, 3x{size}x{size}",
        classes,
    )


def _imagenet_samples(p: Path, image_size, train_subset, val_subset, seed) -> DataBundle:
    src = "imagenet_samples"
    if p.is_dir():
        q = p / "imagenet_samples_100.npz"
        if not q.is_file():
            raise SmcpError(f"data {src}: {p} is a folder without imagenet_samples_100.npz; "
                            "point data.path at the .npz")
        p = q
    arrays = _load_npz(src, p)
    _need_keys(src, p, arrays, ("jpeg_bytes", "offsets", "labels"))
    y = _int_array(src, p, arrays, "labels", 0, 1000, "labels (ImageNet class indices)")
    if len(arrays["offsets"]) != len(y) + 1:
        raise SmcpError(f"data {src}: {p}: offsets must have len(labels)+1 entries")
    _check_offsets(src, p, arrays, "offsets", "jpeg_bytes")
    size = image_size or 224
    tf = imagenet_eval_transform(size)
    train = JpegBlob(arrays["jpeg_bytes"], arrays["offsets"], y, _train_indices(len(y), train_subset, seed), tf,
                     as_tensor=False, origin=str(p))
    val = JpegBlob(arrays["jpeg_bytes"], arrays["offsets"], y, _val_indices(len(y), val_subset), tf,
                   as_tensor=False, origin=str(p))
    return DataBundle(
        train, val, 1000, (3, size, size), IMAGENET_MEAN, IMAGENET_STD,
        f"imagenet_samples ({p.name}): {len(val)} images (val-only; train = same images, no augmentation), "
        f"1000 classes, 3x{size}x{size}",
        None,
    )


def _synthetic(image_size, train_subset, val_subset, seed, num_classes, input_shape) -> DataBundle:
    shape = tuple(input_shape) if input_shape is not None else (3, 32, 32)
    if len(shape) != 3 or any(isinstance(s, bool) or not isinstance(s, (int, np.integer)) or s < 1 for s in shape):
        raise SmcpError(f"data synthetic: input_shape must be three positive integers C,H,W (got {input_shape!r})")
    shape = tuple(int(s) for s in shape)
    if image_size is not None:
        shape = (shape[0], image_size, image_size)
    nc = num_classes or 10
    n_train, n_val = train_subset or 256, val_subset or 64
    train = SyntheticImages(n_train, nc, shape, seed, offset=0)
    val = SyntheticImages(n_val, nc, shape, seed, offset=n_train)
    c = shape[0]
    return DataBundle(
        train, val, nc, shape, (0.0,) * c, (1.0,) * c,
        f"synthetic (seed {seed}): {n_train} train / {n_val} val, {nc} classes, {'x'.join(map(str, shape))}",
        None,
    )


def build_data(
    source: str,
    *,
    path: str | Path | None = None,
    image_size: int | None = None,
    train_subset: int | None = None,
    val_subset: int | None = None,
    seed: int = 0,
    augment: bool = True,
    val_source: str | None = None,
    val_path: str | Path | None = None,
    num_classes: int | None = None,
    input_shape: tuple[int, int, int] | None = None,
    base_dir: str | Path | None = None,
) -> DataBundle:
    """Build the train/val datasets for ``source`` (see the module docstring)."""
    if not isinstance(source, str) or source not in SOURCES:
        import difflib

        close = difflib.get_close_matches(str(source), SOURCES, n=1)
        raise SmcpError(
            f"unknown data source {source!r}; valid: {', '.join(SOURCES)}"
            + (f"; did you mean {close[0]}?" if close else "")
        )
    image_size = _check_pos_int("image_size", image_size, source)
    train_subset = _check_pos_int("train_subset", train_subset, source)
    val_subset = _check_pos_int("val_subset", val_subset, source)
    num_classes = _check_pos_int("num_classes", num_classes, source)
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise SmcpError(f"data {source}: seed must be a non-negative integer (got {seed!r})")
    if input_shape is not None and source != "synthetic":
        raise SmcpError(f"data {source}: input_shape only applies to the synthetic source; use image_size")

    if source == "digits":
        bundle = _digits(image_size, train_subset, val_subset, seed, augment)
    elif source == "cifar10":
        bundle = _cifar10(_require_path(source, path, base_dir), image_size, train_subset, val_subset, seed, augment)
    elif source == "imagefolder":
        bundle = _imagefolder(_require_path(source, path, base_dir), image_size, train_subset, val_subset, seed,
                              augment)
    elif source == "imagenet_samples":
        bundle = _imagenet_samples(_require_path(source, path, base_dir), image_size, train_subset, val_subset, seed)
    else:
        bundle = _synthetic(image_size, train_subset, val_subset, seed, num_classes, input_shape)

    if num_classes is not None and num_classes != bundle.num_classes:
        raise SmcpError(
            f"data {source}: num_classes={num_classes} but the data has {bundle.num_classes} classes; "
            f"remove num_classes or fix it"
        )

    if val_path is not None or val_source is not None:
        vsrc = val_source or source
        if vsrc != "synthetic" and val_path is None:
            raise SmcpError(f"data: val_source {vsrc} needs val_path")
        other = build_data(
            vsrc, path=val_path, image_size=image_size or bundle.input_shape[1], train_subset=1,
            val_subset=val_subset, seed=seed, augment=False,
            num_classes=bundle.num_classes if vsrc == "synthetic" else None,
            input_shape=bundle.input_shape if vsrc == "synthetic" else None, base_dir=base_dir,
        )
        if other.num_classes != bundle.num_classes or other.input_shape != bundle.input_shape:
            raise SmcpError(
                f"data: validation data ({vsrc} {val_path}) has {other.num_classes} classes of shape "
                f"{other.input_shape} but the training data has {bundle.num_classes} of shape {bundle.input_shape}"
            )
        if tuple(other.mean) != tuple(bundle.mean) or tuple(other.std) != tuple(bundle.std):
            raise SmcpError(f"data: validation data ({vsrc}) uses a different normalisation than {source}")
        bundle.val = other.val
        bundle.description += f"; val from {other.description.split(':', 1)[0]}: {len(other.val)} images"
    return bundle


# ------------------------------------------------------------------------------------------- loader


def _seed_worker(worker_id: int) -> None:
    s = torch.initial_seed() % 2**32  # set per worker by DataLoader from its generator
    np.random.seed(s)
    random.seed(s)


def make_loader(
    dataset: Dataset,
    batch_size: int,
    shuffle: bool,
    seed: int = 0,
    workers: int = 0,
    drop_last: bool = False,
    shard: bool = False,
    pin_memory: bool = False,
) -> DataLoader:
    """A DataLoader whose order (and worker seeds) depend only on ``seed``.

    With ``shard`` and an initialised process group of several ranks, each rank reads its own
    disjoint share of the (seeded, identical on every rank) permutation.  ``pin_memory`` (for a
    CUDA training device) returns batches in page-locked memory, so that ``.to(device,
    non_blocking=True)`` copies really overlap with the GPU's work; ignored without CUDA.

    Note: with ``workers=0`` augmentation draws from torch's global RNG; seed it (``torch.manual_seed``)
    for bit-exact reproducibility.
    """
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise SmcpError(f"batch_size must be a positive integer (got {batch_size!r})")
    if isinstance(workers, bool) or not isinstance(workers, int) or workers < 0:
        raise SmcpError(f"workers must be a non-negative integer (got {workers!r})")
    g = torch.Generator()
    g.manual_seed(int(seed))
    pin = bool(pin_memory) and torch.cuda.is_available()

    if shard and _dist.active():
        from torch.utils.data.distributed import DistributedSampler

        sampler = DistributedSampler(dataset, num_replicas=_dist.world(), rank=_dist.rank(), shuffle=shuffle,
                                     seed=int(seed), drop_last=drop_last)
        return DataLoader(dataset, batch_size=batch_size, sampler=sampler, num_workers=workers,
                          drop_last=drop_last, worker_init_fn=_seed_worker if workers > 0 else None,
                          persistent_workers=False, pin_memory=pin)
    return DataLoader(
        dataset,
        batch_size=batch_size,
        shuffle=shuffle,
        generator=g,
        num_workers=workers,
        drop_last=drop_last,
        worker_init_fn=_seed_worker if workers > 0 else None,
        persistent_workers=False,
        pin_memory=pin,
    )
