"""Bad data gives one clear line (issue 17): imagefolder class counts and empty class folders, npz
labels/indices/offsets that a cast would silently change, and errors from DataLoader workers."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from smcp_core.data import build_data, class_count, make_loader
from smcp_core.data.datasets import DataError
from smcp_core.errors import SmcpError


def one_line(info: pytest.ExceptionInfo) -> str:
    msg = str(info.value)
    assert msg and "\n" not in msg and "Traceback" not in msg, repr(msg)
    return msg


def tree(root: Path, classes=("cat", "dog"), per_class=2, splits=("train", "val")) -> Path:
    for split in splits:
        for c in classes:
            d = root / split / c
            d.mkdir(parents=True)
            for k in range(per_class):
                Image.fromarray(np.full((10, 12, 3), 40 * k, dtype=np.uint8)).save(d / f"{k}.png")
    return root


def exact_npz(path: Path, **override) -> Path:
    rng = np.random.default_rng(0)
    arrays = dict(
        train_x=rng.integers(0, 256, (6, 32, 32, 3), dtype=np.uint8),
        train_idx=np.arange(6, dtype=np.int64) * 2,
        train_y_all=(np.arange(12) % 10).astype(np.int64),
        test_x=rng.integers(0, 256, (4, 32, 32, 3), dtype=np.uint8),
        test_idx=np.arange(4, dtype=np.int64),
        test_y_all=(np.arange(8) % 10).astype(np.int64),
    )
    arrays.update(override)
    np.savez(path, **arrays)
    return path


def jpeg_npz(path: Path, **override) -> Path:
    out = {}
    for split, n in (("train", 3), ("test", 2)):
        blobs = []
        for k in range(n):
            buf = io.BytesIO()
            Image.fromarray(np.full((32, 32, 3), 30 * k, dtype=np.uint8)).save(buf, "JPEG")
            blobs.append(np.frombuffer(buf.getvalue(), dtype=np.uint8))
        out[f"{split}_jpeg"] = np.concatenate(blobs)
        out[f"{split}_offsets"] = np.concatenate([[0], np.cumsum([len(b) for b in blobs])]).astype(np.int64)
        out[f"{split}_y"] = (np.arange(n) % 10).astype(np.int64)
    out.update(override)
    np.savez(path, **out)
    return path


# ------------------------------------------------------------------------------------- imagefolder


def test_class_count_from_imagefolder(tmp_path):
    root = tree(tmp_path / "ds", classes=[f"c{i:02d}" for i in range(12)], per_class=1)
    assert class_count("imagefolder", root) == 12
    assert build_data("imagefolder", path=root, image_size=8).num_classes == 12
    assert class_count("imagefolder", "ds", base_dir=tmp_path) == 12
    assert class_count("digits") == 10 and class_count("cifar10") == 10
    assert class_count("imagenet_samples") == 1000 and class_count("synthetic") is None


def test_class_count_errors_are_one_line(tmp_path):
    with pytest.raises(SmcpError) as info:
        class_count("imagefolder", tmp_path / "missing")
    assert "not found" in one_line(info)
    with pytest.raises(SmcpError) as info:
        class_count("imagefolder", None)
    assert "needs a path" in one_line(info)


def test_empty_class_folder_is_not_a_class(tmp_path):
    root = tree(tmp_path / "ds")
    (root / "train" / "emu").mkdir()
    (root / "train" / "emu" / "readme.txt").write_text("no images")
    for call in (lambda: build_data("imagefolder", path=root, image_size=8),
                 lambda: class_count("imagefolder", root)):
        with pytest.raises(SmcpError) as info:
            call()
        msg = one_line(info)
        assert "emu" in msg and "has no images" in msg, msg


def test_single_class_imagefolder_is_refused(tmp_path):
    root = tree(tmp_path / "ds", classes=("cat",))
    with pytest.raises(SmcpError) as info:
        build_data("imagefolder", path=root, image_size=8)
    assert "only one class folder (cat)" in one_line(info)


def test_given_num_classes_must_match_the_folders(tmp_path):
    root = tree(tmp_path / "ds", classes=("a", "b", "c"), per_class=1)
    with pytest.raises(SmcpError) as info:
        build_data("imagefolder", path=root, image_size=8, num_classes=10)
    assert "num_classes=10" in one_line(info) and "3 classes" in str(info.value)


# ---------------------------------------------------------------------------------------- npz files


@pytest.mark.parametrize("key, value, words", [
    ("train_y_all", (np.arange(12) % 10).astype(np.float32) + 0.5, ["train_y_all", "integer", "0.5"]),
    ("train_y_all", np.full(12, 10, dtype=np.int64), ["train_y_all", "0..9", "max 10"]),
    ("test_y_all", np.full(8, -1, dtype=np.int64), ["test_y_all", "0..9", "min -1"]),
    ("train_idx", np.array([0, 2, 4, 6, 8, -1]), ["train_idx", "0..11", "min -1"]),
    ("test_idx", np.array([0, 1, 2, 8]), ["test_idx", "0..7", "max 8"]),
    ("train_idx", np.arange(6) * 2.0 + 0.25, ["train_idx", "integer"]),
    ("train_idx", np.arange(5) * 2, ["train_idx", "5 entries", "6 images"]),
])
def test_cifar10_exact_bad_labels_and_indices(tmp_path, key, value, words):
    path = exact_npz(tmp_path / "exact.npz", **{key: value})
    with pytest.raises(SmcpError) as info:
        build_data("cifar10", path=path)
    msg = one_line(info)
    for w in [str(path), *words]:
        assert w in msg, (w, msg)


def test_cifar10_whole_valued_float_labels_are_kept(tmp_path):
    path = exact_npz(tmp_path / "exact.npz", train_y_all=(np.arange(12) % 10).astype(np.float64))
    b = build_data("cifar10", path=path, augment=False)
    assert b.train.labels.tolist() == [0, 2, 4, 6, 8, 0]


@pytest.mark.parametrize("key, value, words", [
    ("train_y", np.array([0.0, 1.7, 2.0]), ["train_y", "integer", "1.7"]),
    ("test_y", np.array([0, 11]), ["test_y", "0..9", "max 11"]),
    ("train_offsets", None, ["train_offsets", "offsets into train_jpeg"]),
])
def test_cifar10_jpeg_bad_labels_and_offsets(tmp_path, key, value, words):
    if value is None:  # past the end of the blob
        good = np.load(jpeg_npz(tmp_path / "good.npz"))["train_offsets"]
        value = good.copy()
        value[-1] += 100
    path = jpeg_npz(tmp_path / "jpeg.npz", **{key: value})
    with pytest.raises(SmcpError) as info:
        build_data("cifar10", path=path)
    msg = one_line(info)
    for w in [str(path), *words]:
        assert w in msg, (w, msg)


def test_imagenet_samples_labels_out_of_range(tmp_path):
    good = jpeg_npz(tmp_path / "j.npz")
    z = np.load(good)
    path = tmp_path / "imagenet_samples_100.npz"
    np.savez(path, jpeg_bytes=z["train_jpeg"], offsets=z["train_offsets"], labels=np.array([0, 5, 1000]))
    with pytest.raises(SmcpError) as info:
        build_data("imagenet_samples", path=path)
    msg = one_line(info)
    assert str(path) in msg and "labels" in msg and "0..999" in msg and "max 1000" in msg, msg
    np.savez(path, jpeg_bytes=z["train_jpeg"], offsets=z["train_offsets"], labels=np.array([0.0, 5.5, 7.0]))
    with pytest.raises(SmcpError) as info:
        build_data("imagenet_samples", path=path)
    assert "integer" in one_line(info)


# ------------------------------------------------------------------------------------------ workers


def test_worker_error_is_the_original_line(tmp_path):
    root = tree(tmp_path / "ds")
    (root / "val" / "cat" / "9.jpg").write_bytes(b"garbage")
    b = build_data("imagefolder", path=root, image_size=8)
    with pytest.raises(SmcpError) as info:
        for _ in make_loader(b.val, batch_size=8, shuffle=False, workers=1):
            pass
    msg = one_line(info)
    assert isinstance(info.value, DataError)
    assert msg.startswith(f"image {root / 'val' / 'cat' / '9.jpg'} cannot be read"), msg
    assert msg.endswith("(in DataLoader worker process 0)"), msg


def test_data_error_message_unchanged_in_process():
    assert str(DataError("image x cannot be read")) == "image x cannot be read"
