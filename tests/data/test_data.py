"""Data registry: every source, subsets, transforms, loaders and the errors for bad input."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from conftest import require_shared
from PIL import Image

from smcp_core.data import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    DataBundle,
    build_data,
    make_loader,
)
from smcp_core.data.transforms import (
    CenterCrop,
    RandomResizedCrop,
    ResizeShorter,
    imagenet_eval_transform,
)
from smcp_core.errors import SmcpError


def _labels(ds):
    return [ds[i][1] for i in range(len(ds))]


# ------------------------------------------------------------------------------------------- digits


def test_digits_bundle():
    b = build_data("digits", seed=0)
    assert isinstance(b, DataBundle)
    assert b.num_classes == 10 and b.input_shape == (1, 32, 32)
    assert len(b.train) + len(b.val) == 1797
    assert abs(len(b.val) - 0.2 * 1797) <= 10
    x, y = b.train[0]
    assert x.dtype == torch.float32 and x.shape == (1, 32, 32) and isinstance(y, int) and 0 <= y <= 9
    # stratified: every class present in val in roughly the overall proportion
    counts = np.bincount(b.val.labels, minlength=10)
    assert counts.min() >= 30
    # train and val are disjoint
    assert not set(b.train.indices) & set(b.val.indices)
    # normalised with the dataset statistics
    xv = torch.stack([b.val[i][0] for i in range(len(b.val))])
    assert abs(xv.mean().item()) < 0.1 and abs(xv.std().item() - 1) < 0.1
    assert "digits" in b.description and "\n" not in b.description


def test_digits_determinism_subsets_and_size():
    a = build_data("digits", seed=1, augment=False)
    b = build_data("digits", seed=1, augment=False)
    c = build_data("digits", seed=2, augment=False)
    assert np.array_equal(a.train.indices, b.train.indices)
    assert not np.array_equal(a.train.indices, c.train.indices)
    assert torch.equal(a.train[5][0], b.train[5][0])
    s = build_data("digits", seed=1, train_subset=100, val_subset=30, image_size=16)
    assert len(s.train) == 100 and len(s.val) == 30 and s.input_shape == (1, 16, 16)
    assert np.array_equal(s.train.indices, a.train.indices[:100])
    assert s.train[0][0].shape == (1, 16, 16)


def test_digits_augment_shifts():
    torch.manual_seed(0)
    aug = build_data("digits", seed=0, augment=True)
    plain = build_data("digits", seed=0, augment=False)
    outs = [aug.train[0][0] for _ in range(8)]
    assert all(o.shape == (1, 32, 32) for o in outs)
    assert any(not torch.equal(o, plain.train[0][0]) for o in outs)
    assert torch.equal(aug.val[0][0], plain.val[0][0])  # val is never augmented


# ------------------------------------------------------------------------------------------ cifar10


def _fake_cifar_exact(path, n_train=12, n_test=7, seed=0):
    rng = np.random.default_rng(seed)
    np.savez(
        path,
        train_x=rng.integers(0, 256, (n_train, 32, 32, 3), dtype=np.uint8),
        train_idx=np.arange(n_train, dtype=np.int32) * 3,
        train_y_all=(np.arange(n_train * 3) % 10).astype(np.uint8),
        test_x=rng.integers(0, 256, (n_test, 32, 32, 3), dtype=np.uint8),
        test_idx=np.arange(n_test, dtype=np.int32),
        test_y_all=((np.arange(20) * 7) % 10).astype(np.uint8),
        label_names=np.array(["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship",
                              "truck"]),
    )
    return path


def _fake_cifar_jpeg(path, n_train=9, n_test=5, seed=0):
    rng = np.random.default_rng(seed)
    out = {}
    for split, n in (("train", n_train), ("test", n_test)):
        blobs = []
        for _ in range(n):
            buf = io.BytesIO()
            Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(buf, "JPEG", quality=75)
            blobs.append(np.frombuffer(buf.getvalue(), dtype=np.uint8))
        out[f"{split}_jpeg"] = np.concatenate(blobs)
        out[f"{split}_offsets"] = np.concatenate([[0], np.cumsum([len(b) for b in blobs])]).astype(np.int64)
        out[f"{split}_y"] = (np.arange(n) % 10).astype(np.uint8)
    np.savez(path, **out)
    return path


def test_cifar10_exact_layout(tmp_path):
    p = _fake_cifar_exact(tmp_path / "exact.npz")
    b = build_data("cifar10", path=p, augment=False)
    assert (len(b.train), len(b.val), b.num_classes, b.input_shape) == (12, 7, 10, (3, 32, 32))
    assert (b.mean, b.std) == (IMAGENET_MEAN, IMAGENET_STD)
    raw = np.load(p)
    assert _labels(b.val) == raw["test_y_all"][raw["test_idx"]].tolist()
    assert _labels(b.train) == raw["train_y_all"][raw["train_idx"]].tolist()
    expected = ((torch.from_numpy(raw["test_x"][3]).permute(2, 0, 1).float() / 255
                 - torch.tensor(IMAGENET_MEAN).view(3, 1, 1))
                / torch.tensor(IMAGENET_STD).view(3, 1, 1))
    torch.testing.assert_close(b.val[3][0], expected)
    assert b.class_names[0] == "airplane"
    s = build_data("cifar10", path=p, train_subset=5, val_subset=3, seed=4)
    assert len(s.train) == 5 and len(s.val) == 3
    assert s.val.indices.tolist() == [0, 1, 2]
    assert build_data("cifar10", path=p, train_subset=5, seed=4).train.indices.tolist() == s.train.indices.tolist()
    torch.manual_seed(0)
    assert s.train[0][0].shape == (3, 32, 32)  # augmented (crop + flip) keeps the shape


def test_cifar10_jpeg_layout_and_val_path(tmp_path):
    pj = _fake_cifar_jpeg(tmp_path / "jpeg.npz")
    pe = _fake_cifar_exact(tmp_path / "exact.npz")
    b = build_data("cifar10", path=pj)
    assert (len(b.train), len(b.val)) == (9, 5)
    x, y = b.val[2]
    assert x.shape == (3, 32, 32) and y == 2
    mixed = build_data("cifar10", path=pj, val_path=pe, val_subset=4)
    assert len(mixed.train) == 9 and len(mixed.val) == 4
    assert "val from" in mixed.description
    big = build_data("cifar10", path=pe, image_size=40, augment=True)
    assert big.input_shape == (3, 40, 40) and big.train[0][0].shape == (3, 40, 40)


def test_cifar10_errors(tmp_path):
    with pytest.raises(SmcpError, match="needs a path"):
        build_data("cifar10")
    with pytest.raises(SmcpError, match=str(tmp_path / "missing.npz")):
        build_data("cifar10", path=tmp_path / "missing.npz")
    np.savez(tmp_path / "other.npz", foo=np.zeros(3))
    with pytest.raises(SmcpError, match="found: foo"):
        build_data("cifar10", path=tmp_path / "other.npz")
    (tmp_path / "junk.npz").write_text("not an npz")
    with pytest.raises(SmcpError, match="not a readable .npz"):
        build_data("cifar10", path=tmp_path / "junk.npz")
    _fake_cifar_exact(tmp_path / "exact.npz")
    with pytest.raises(SmcpError, match="is a folder"):
        build_data("cifar10", path=tmp_path)
    with pytest.raises(SmcpError, match="num_classes=5"):
        build_data("cifar10", path=tmp_path / "exact.npz", num_classes=5)
    with pytest.raises(SmcpError, match="image_size"):
        build_data("cifar10", path=tmp_path / "exact.npz", image_size=0)
    tree = _tree(tmp_path / "tree")
    with pytest.raises(SmcpError, match="has 2 classes"):
        build_data("cifar10", path=tmp_path / "exact.npz", val_source="imagefolder", val_path=tree)


def test_cifar10_shared_files(shared_data):
    exact = shared_data / "cifar10/cifar10_exact_subset.npz"
    jpeg = shared_data / "cifar10/cifar10_jpeg.npz"
    if not (exact.is_file() and jpeg.is_file()):
        pytest.skip(f"shared CIFAR-10 files not found under {shared_data / 'cifar10'}")
    b = build_data("cifar10", path=exact, augment=False)
    assert (len(b.train), len(b.val)) == (5085, 1017)
    raw = np.load(exact)
    assert b.val.labels.tolist() == raw["test_y_all"][raw["test_idx"]].tolist()
    j = build_data("cifar10", path=jpeg, train_subset=64, val_subset=16)
    assert (len(j.train), len(j.val)) == (64, 16)
    assert j.val[0][0].shape == (3, 32, 32) and j.val[0][1] == int(np.load(jpeg)["test_y"][0])


# ------------------------------------------------------------------------------------- imagefolder


def _tree(root, classes=("cat", "dog"), per_class=3, splits=("train", "val")):
    rng = np.random.default_rng(0)
    for split in splits:
        for c in classes:
            d = root / split / c
            d.mkdir(parents=True)
            for k in range(per_class):
                h, w = 40 + 7 * k, 60 - 5 * k
                img = Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))
                img.save(d / f"{k}.{'png' if k % 2 else 'jpg'}")
    return root


def test_imagefolder(tmp_path):
    root = _tree(tmp_path / "ds")
    (root / "train" / "cat" / "notes.txt").write_text("ignored")
    Image.new("L", (30, 50)).save(root / "val" / "dog" / "gray.png")  # grayscale -> RGB
    b = build_data("imagefolder", path=root, image_size=32)
    assert b.num_classes == 2 and b.class_names == ["cat", "dog"] and b.input_shape == (3, 32, 32)
    assert (len(b.train), len(b.val)) == (6, 7)
    torch.manual_seed(0)
    for ds in (b.train, b.val):
        for i in range(len(ds)):
            x, y = ds[i]
            assert x.shape == (3, 32, 32) and x.dtype == torch.float32 and y in (0, 1)
    assert _labels(b.val) == [0, 0, 0, 1, 1, 1, 1]
    assert build_data("imagefolder", path=root).input_shape == (3, 224, 224)  # default size
    assert len(build_data("imagefolder", path=root, train_subset=2, val_subset=1).val) == 1


def test_imagefolder_errors(tmp_path):
    with pytest.raises(SmcpError, match="not found"):
        build_data("imagefolder", path=tmp_path / "nope")
    _tree(tmp_path / "noval", splits=("train",))
    with pytest.raises(SmcpError, match="val"):
        build_data("imagefolder", path=tmp_path / "noval")
    (tmp_path / "empty" / "train").mkdir(parents=True)
    (tmp_path / "empty" / "val").mkdir(parents=True)
    with pytest.raises(SmcpError, match="no class sub-folders"):
        build_data("imagefolder", path=tmp_path / "empty")
    root = _tree(tmp_path / "extra")
    (root / "val" / "bird").mkdir()
    with pytest.raises(SmcpError, match="bird"):
        build_data("imagefolder", path=root)
    root = _tree(tmp_path / "corrupt")
    (root / "val" / "cat" / "9.jpg").write_bytes(b"garbage")
    b = build_data("imagefolder", path=root, image_size=16)
    bad = [i for i, f in enumerate(b.val.files) if f.endswith("9.jpg")][0]
    with pytest.raises(SmcpError, match="9.jpg"):
        b.val[bad]
    f = tmp_path / "file.txt"
    f.write_text("x")
    with pytest.raises(SmcpError, match="not a folder"):
        build_data("imagefolder", path=f)


def test_eval_transform_matches_torchvision():
    """Our Pillow transforms reproduce torchvision's Resize + CenterCrop (imported via the shim)."""
    from smcp_core.utils.tv import import_torchvision

    import_torchvision()
    from torchvision.transforms import v2

    rng = np.random.default_rng(0)
    for h, w in [(300, 400), (375, 500), (256, 256), (500, 333)]:
        img = Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))
        tv_img = v2.CenterCrop(224)(v2.Resize(256)(img))
        ours = CenterCrop(224)(ResizeShorter(256)(img))
        assert np.array_equal(np.array(tv_img), np.array(ours))
        tv_t = v2.Compose([v2.Resize(256), v2.CenterCrop(224), v2.PILToTensor(), v2.ToDtype(torch.float32, scale=True),
                           v2.Normalize(IMAGENET_MEAN, IMAGENET_STD)])(img)
        torch.testing.assert_close(imagenet_eval_transform(224)(img), tv_t)
    torch.manual_seed(0)
    out = RandomResizedCrop(48)(Image.new("RGB", (100, 70)))
    assert out.size == (48, 48)


# --------------------------------------------------------------------------------- imagenet samples


def test_imagenet_samples():
    root = require_shared("imagenet/imagenet_samples_100.npz")
    b = build_data("imagenet_samples", path=root / "imagenet")  # the folder works too
    assert (len(b.train), len(b.val), b.num_classes, b.input_shape) == (100, 100, 1000, (3, 224, 224))
    assert b.val.labels.tolist() == list(range(0, 1000, 10))
    x, y = b.val[1]
    assert x.shape == (3, 224, 224) and y == 10
    torch.testing.assert_close(b.train[1][0], x)  # train = same images, no augmentation
    with pytest.raises(SmcpError, match="without imagenet_samples_100.npz"):
        build_data("imagenet_samples", path=root / "models")


# ------------------------------------------------------------------------------- synthetic, loaders


def test_synthetic():
    a = build_data("synthetic", num_classes=4, input_shape=(2, 8, 8), train_subset=20, val_subset=6, seed=3)
    b = build_data("synthetic", num_classes=4, input_shape=(2, 8, 8), train_subset=20, val_subset=6, seed=3)
    assert (len(a.train), len(a.val), a.num_classes, a.input_shape) == (20, 6, 4, (2, 8, 8))
    assert torch.equal(a.train[7][0], b.train[7][0]) and a.train[7][1] == b.train[7][1]
    assert not torch.equal(a.train[0][0], a.val[0][0])
    assert set(_labels(a.train)) <= set(range(4))
    c = build_data("synthetic", seed=4)
    assert c.input_shape == (3, 32, 32) and c.num_classes == 10 and len(c.train) == 256
    assert build_data("synthetic", image_size=16).train[0][0].shape == (3, 16, 16)
    with pytest.raises(SmcpError, match="input_shape"):
        build_data("synthetic", input_shape=(3, 0, 8))
    with pytest.raises(SmcpError, match="only applies to the synthetic"):
        build_data("digits", input_shape=(1, 8, 8))


def test_unknown_source_and_bad_options():
    with pytest.raises(SmcpError) as ei:
        build_data("cifar100")
    assert "digits, cifar10, imagefolder, imagenet_samples, synthetic" in str(ei.value)
    with pytest.raises(SmcpError, match="train_subset"):
        build_data("digits", train_subset=-1)
    with pytest.raises(SmcpError, match="seed"):
        build_data("digits", seed=-3)


def test_make_loader_deterministic():
    b = build_data("synthetic", num_classes=10, input_shape=(1, 4, 4), train_subset=50, seed=0)

    def order(seed):
        return torch.cat([y for _, y in make_loader(b.train, 8, shuffle=True, seed=seed)]).tolist()

    assert order(1) == order(1)
    assert order(1) != order(2)
    batches = list(make_loader(b.train, 8, shuffle=False, seed=0, drop_last=True))
    assert len(batches) == 6 and batches[0][0].shape == (8, 1, 4, 4)
    with pytest.raises(SmcpError, match="batch_size"):
        make_loader(b.train, 0, shuffle=False, seed=0)
