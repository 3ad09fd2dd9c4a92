"""Model registry, built-in architectures, checkpoint loading and the torchvision shim."""

from __future__ import annotations

import textwrap

import pytest
import torch
from conftest import require_shared
from torch import nn

from smcp_core.errors import SmcpError
from smcp_core.models import build_model, list_models, load_checkpoint
from smcp_core.models.cifar_resnet import PadShortcut


def _top1(model: nn.Module, x: torch.Tensor, y: torch.Tensor, batch: int = 512) -> int:
    model.eval()
    correct = 0
    with torch.inference_mode():
        for i in range(0, len(x), batch):
            correct += (model(x[i : i + batch]).argmax(1) == y[i : i + batch]).sum().item()
    return correct


def _stack(ds):
    xs, ys = zip(*(ds[i] for i in range(len(ds))))
    return torch.stack(xs), torch.tensor(ys)


# ------------------------------------------------------------------------------ pretrained accuracy


@pytest.fixture(scope="module")
def cifar_exact_test():
    root = require_shared("cifar10/cifar10_exact_subset.npz")
    from smcp_core.data import build_data

    bundle = build_data("cifar10", path=root / "cifar10/cifar10_exact_subset.npz", augment=False)
    return _stack(bundle.val)


@pytest.mark.slow
@pytest.mark.parametrize(
    "name, ckpt, expected",
    [("resnet20", "resnet20-12fca82f.th", 91.64), ("resnet56", "resnet56-4bfd9763.th", 92.72)],
)
def test_cifar_resnet_pretrained_top1(cifar_exact_test, name, ckpt, expected):
    root = require_shared(f"models/{ckpt}")
    model = build_model(f"cifar/{name}")
    meta = load_checkpoint(model, root / "models" / ckpt)
    assert "best_prec1" in meta
    x, y = cifar_exact_test
    assert len(y) == 1017
    acc = 100.0 * _top1(model, x, y) / len(y)
    assert acc == pytest.approx(expected, abs=0.2)


@pytest.mark.slow
def test_mobilenet_v1_pretrained_imagenet_samples():
    root = require_shared("models/mobilenetV1X0.25_pretrain.tar", "imagenet/imagenet_samples_100.npz")
    from smcp_core.data import build_data

    model = build_model("mobilenet_v1", kwargs={"width": 0.25})
    meta = load_checkpoint(model, root / "models/mobilenetV1X0.25_pretrain.tar")
    assert meta["best_acc1"] == pytest.approx(46.58, abs=0.01)
    bundle = build_data("imagenet_samples", path=root / "imagenet/imagenet_samples_100.npz")
    x, y = _stack(bundle.val)
    assert x.shape == (100, 3, 224, 224)
    assert abs(_top1(model, x, y) - 58) <= 1


@pytest.mark.slow
def test_user_mobilenet_v1_025_file_pretrained_then_short_smcp_run_slim_predicts_the_same(tmp_path):
    """The pretrained MobileNetV1-0.25 through a *user model file*: its top-1 on the 100 ImageNet
    samples is reproduced; after a short SMCP run (FLOPs target) and slimming, the slim model's
    predictions equal the masked model's on every image."""
    root = require_shared("models/mobilenetV1X0.25_pretrain.tar", "imagenet/imagenet_samples_100.npz")
    from pathlib import Path

    from smcp_core import stages
    from smcp_core.config.recipe import load_recipe

    user_file = Path(__file__).resolve().parents[1] / "fixtures" / "mobilenet_v1_025.py"
    ckpt = root / "models/mobilenetV1X0.25_pretrain.tar"
    data = root / "imagenet/imagenet_samples_100.npz"
    recipe = load_recipe("quickstart", [
        f"model.source={user_file}:build", f"model.checkpoint={ckpt}", "model.kwargs={}",
        "model.num_classes=null", "data.source=imagenet_samples", f"data.path={data}",
        "data.image_size=224", "data.batch_size=25", "data.augment=false",
        "prune.target.flops_ratio=0.7", "prune.epochs=2", "prune.warmup_epochs=0", "prune.ramp_epochs=1",
        "prune.cooldown_epochs=1", "prune.update_interval_samples=50", "prune.optimizer.lr=0.001",
        "prune.optimizer.weight_decay=0", "prune.label_smoothing=0", "prune.channel_round=8",
        "prune.min_channels=8",
    ])
    model = stages.build_model(recipe)
    bundle = stages.build_data(recipe)
    x, y = _stack(bundle.val)
    assert x.shape == (100, 3, 224, 224)
    assert abs(_top1(model, x, y) - 58) <= 1  # 57 here: PIL's resize differs slightly from the original's

    summary = stages.prune(recipe, tmp_path).to_dict()
    assert summary["meets_budget"] and summary["flops_ratio"] <= 0.7 + 1e-9
    stages.slim(recipe, tmp_path)
    masked, _, keep = stages.load_pruned(recipe, tmp_path)
    assert not bool(keep.all())
    slim = stages.load_slim(recipe, tmp_path)
    assert sum(p.numel() for p in slim.parameters()) < sum(p.numel() for p in model.parameters())
    with torch.inference_mode():
        a, b = masked(x), slim.eval()(x)
    assert float((a - b).abs().max()) <= 1e-4
    assert torch.equal(a.argmax(1), b.argmax(1))


# ----------------------------------------------------------------------------------- architectures


def test_cifar_resnet_structure():
    m = build_model("cifar/resnet20")
    assert sum(p.numel() for p in m.parameters()) == 269_722  # the published ResNet-20 size
    assert not any("shortcut" in k for k in m.state_dict())  # option A has no parameters
    assert isinstance(m.layer2[0].shortcut, PadShortcut)
    assert isinstance(m.layer1[0].shortcut, nn.Identity)
    assert m(torch.randn(2, 3, 32, 32)).shape == (2, 10)
    for name, n in [("resnet32", 5), ("resnet44", 7), ("resnet56", 9), ("resnet110", 18)]:
        assert len(build_model(f"cifar/{name}").layer3) == n
    m = build_model("cifar/resnet20", num_classes=100, kwargs={"in_channels": 1})
    assert m(torch.randn(1, 1, 32, 32)).shape == (1, 100)


def test_pad_shortcut():
    x = torch.randn(2, 16, 8, 8)
    out = PadShortcut(32)(x)
    assert out.shape == (2, 32, 4, 4)
    assert torch.equal(out[:, 8:24], x[:, :, ::2, ::2])
    assert out[:, :8].abs().sum() == 0 and out[:, 24:].abs().sum() == 0


def test_mobilenet_v1_widths():
    def pointwise_outs(m):
        return [blk[3].out_channels for st in (m.stage1, m.stage2, m.stage3) for blk in st if len(blk) == 6]

    m = build_model("mobilenet_v1", kwargs={"width": 0.25})
    assert m.stage1[0][0].out_channels == 8
    assert pointwise_outs(m) == [16, 32, 32, 64, 64] + [128] * 6 + [256, 256]
    assert m.fc.in_features == 256 and m.fc.out_features == 1000
    m = build_model("mobilenet_v1", num_classes=10)
    assert m.stage1[0][0].out_channels == 32
    assert pointwise_outs(m) == [64, 128, 128, 256, 256] + [512] * 6 + [1024, 1024]
    assert m(torch.randn(1, 3, 64, 64)).shape == (1, 10)


@pytest.mark.parametrize(
    "source, kwargs, shape",
    [
        ("cifar/resnet20", None, (2, 3, 32, 32)),
        ("mobilenet_v1", {"width": 0.25}, (2, 3, 96, 96)),
    ],
)
def test_fx_trace_matches_eager(source, kwargs, shape):
    torch.manual_seed(0)
    model = build_model(source, kwargs=kwargs).eval()
    # non-trivial BN statistics so the comparison means something
    for mod in model.modules():
        if isinstance(mod, nn.BatchNorm2d):
            mod.running_mean.uniform_(-0.5, 0.5)
            mod.running_var.uniform_(0.5, 2.0)
    gm = torch.fx.symbolic_trace(model)
    x = torch.randn(shape)
    with torch.no_grad():
        torch.testing.assert_close(gm(x), model(x), rtol=0, atol=0)
    # the option-A shortcut is traced through: a strided getitem followed by F.pad
    has_pad = any(n.op == "call_function" and n.target is torch.nn.functional.pad for n in gm.graph.nodes)
    assert has_pad == source.startswith("cifar")


def test_torchvision_model_via_registry():
    m = build_model("torchvision/resnet18", num_classes=10)
    assert m.fc.out_features == 10
    assert m(torch.randn(1, 3, 64, 64)).shape == (1, 10)
    names = list_models()
    assert {"cifar/resnet20", "mobilenet_v1", "torchvision/resnet18", "torchvision/mobilenet_v2"} <= set(names)


def test_torchvision_shim_idempotent():
    from smcp_core.utils.tv import import_torchvision

    tv1, tv2 = import_torchvision(), import_torchvision()
    assert tv1 is tv2
    assert torch.ops.torchvision.nms is not None


def test_torchvision_shim_defines_nothing_when_torchvision_loads_its_own_extension(tmp_path, monkeypatch):
    """A matching torch + torchvision pair: torchvision's compiled extension defines the operators;
    defining them first made its own registration fail (duplicate operator, seen with torch 2.14.1)."""
    import importlib.util
    from types import SimpleNamespace

    from smcp_core.utils import tv

    (tmp_path / "_C.so").write_bytes(b"")
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name: SimpleNamespace(submodule_search_locations=[str(tmp_path)]))
    loaded = []
    monkeypatch.setattr(torch.ops, "load_library", lambda path: loaded.append(path))
    monkeypatch.setattr(tv, "_LIB", None)
    defined = iter([False, True])  # not defined before the extension is loaded, defined after
    monkeypatch.setattr(tv, "_nms_defined", lambda: next(defined))
    monkeypatch.setattr(torch.library, "Library", lambda *a: pytest.fail("defined schemas next to the extension"))
    tv._define_missing_schemas()
    assert loaded == [str(tmp_path / "_C.so")] and tv._LIB is None

    def fails(path):  # a CUDA torchvision next to a CPU torch: the extension does not load
        raise OSError("libcudart.so.13: cannot open shared object file")

    monkeypatch.setattr(torch.ops, "load_library", fails)
    assert tv._own_extension_loads() is False


@pytest.mark.parametrize(
    "source, kwargs, needle",
    [
        ("torchvision/resnet5O", None, "resnet50"),
        ("torchvision/not_a_model_at_all", None, "unknown torchvision"),
        ("cifar/resnet21", None, "cifar/resnet20"),
        ("resnt50", None, "torchvision/resnet50"),
        ("", None, "non-empty"),
        ("mobilenet_v1", {"widht": 0.5}, "width"),
        ("cifar/resnet20", {"depth": 3}, "in_channels"),
        ("torchvision/resnet18", {"bogus": 1}, "bogus"),
        ("model.py", None, "file.py:factory"),
    ],
)
def test_bad_model_sources(source, kwargs, needle):
    with pytest.raises(SmcpError) as ei:
        build_model(source, kwargs=kwargs)
    msg = str(ei.value)
    assert needle in msg and "\n" not in msg


def test_bad_num_classes():
    with pytest.raises(SmcpError, match="num_classes"):
        build_model("cifar/resnet20", num_classes=0)
    with pytest.raises(SmcpError, match="given twice"):
        build_model("cifar/resnet20", num_classes=10, kwargs={"num_classes": 5})


# -------------------------------------------------------------------------------------- user code


def _write(tmp_path, name, body):
    p = tmp_path / name
    p.write_text(textwrap.dedent(body))
    return p


def test_user_model_file(tmp_path):
    p = _write(
        tmp_path,
        "net.py",
        """
        import torch.nn as nn

        def make(num_classes=3, hidden=8):
            return nn.Sequential(nn.Flatten(), nn.Linear(12, hidden), nn.ReLU(), nn.Linear(hidden, num_classes))

        def no_nc(hidden=4):
            return nn.Linear(hidden, 2)

        class Net(nn.Module):
            def __init__(self):
                super().__init__()
                self.fc = nn.Linear(2, 2)
            def forward(self, x):
                return self.fc(x)
        """,
    )
    m = build_model(f"{p}:make", num_classes=5, kwargs={"hidden": 6})
    assert m[-1].out_features == 5 and m[1].out_features == 6
    assert isinstance(build_model(f"{p}:no_nc", num_classes=5), nn.Linear)  # factory without num_classes
    assert isinstance(build_model(f"{p}:Net"), nn.Module)  # a class works as a factory
    assert isinstance(build_model("net.py:make", base_dir=tmp_path), nn.Module)  # relative to base_dir


@pytest.mark.parametrize(
    "body, source_suffix, needles",
    [
        ("import torch.nn as nn\ndef other():\n    return nn.Linear(1, 1)\n", ":make", ["'make' not found", "other"]),
        ("def make(:\n    pass\n", ":make", ["SyntaxError", "bad.py:1"]),
        ("import torch\nimport no_such_module_xyz\n", ":make",
         ["ModuleNotFoundError", "bad.py:2", "no_such_module_xyz"]),
        ("def make():\n    return 42\n", ":make", ["returned int", "nn.Module"]),
        ("def make():\n    raise ValueError('boom')\n", ":make", ["ValueError: boom", "bad.py:2"]),
        ("def make():\n    pass\n", ":make2", ["not found", "make"]),
        ("x = 1\n", ":x", ["not callable"]),
    ],
)
def test_bad_user_model_files(tmp_path, body, source_suffix, needles):
    p = tmp_path / "bad.py"
    p.write_text(body)
    with pytest.raises(SmcpError) as ei:
        build_model(f"{p}{source_suffix}")
    msg = str(ei.value)
    assert "\n" not in msg
    for needle in needles:
        assert needle in msg, msg


def test_user_model_missing_file(tmp_path):
    with pytest.raises(SmcpError, match="not found"):
        build_model(f"{tmp_path / 'nope.py'}:make")


# ------------------------------------------------------------------------------------ checkpoints


def test_load_checkpoint_formats(tmp_path):
    src = build_model("cifar/resnet20")
    sd = src.state_dict()
    variants = {
        "plain.pt": sd,
        "wrapped.pt": {"state_dict": sd, "best_prec1": 90.5, "epoch": 3},
        "model.pt": {"model": sd},
        "prefixed.pt": {"state_dict": {f"module.{k}": v for k, v in sd.items()}},
    }
    for name, obj in variants.items():
        torch.save(obj, tmp_path / name)
        dst = build_model("cifar/resnet20")
        meta = load_checkpoint(dst, tmp_path / name)
        for k, v in dst.state_dict().items():
            assert torch.equal(v, sd[k]), (name, k)
        if name == "wrapped.pt":
            assert meta == {"best_prec1": 90.5, "epoch": 3}


def test_load_checkpoint_errors(tmp_path):
    torch.save(build_model("cifar/resnet20").state_dict(), tmp_path / "r20.pt")
    with pytest.raises(SmcpError, match="missing keys: layer1.3"):
        load_checkpoint(build_model("cifar/resnet32"), tmp_path / "r20.pt")
    with pytest.raises(SmcpError, match="unexpected keys: layer1.3"):
        load_checkpoint(build_model("cifar/resnet20"), _resnet32_ckpt(tmp_path))
    with pytest.raises(SmcpError, match=r"shape mismatch: linear.weight \(10, 64\) vs model \(7, 64\)"):
        load_checkpoint(build_model("cifar/resnet20", num_classes=7), tmp_path / "r20.pt")
    with pytest.raises(SmcpError, match="not found"):
        load_checkpoint(build_model("cifar/resnet20"), tmp_path / "missing.pt")
    (tmp_path / "text.pt").write_text("hello, not a checkpoint\n")
    with pytest.raises(SmcpError, match="not a PyTorch checkpoint"):
        load_checkpoint(build_model("cifar/resnet20"), tmp_path / "text.pt")
    (tmp_path / "empty.pt").write_bytes(b"")
    with pytest.raises(SmcpError, match="empty or truncated"):
        load_checkpoint(build_model("cifar/resnet20"), tmp_path / "empty.pt")
    torch.save(build_model("cifar/resnet20"), tmp_path / "whole.pt")  # a pickled module
    with pytest.raises(SmcpError, match="--trust-checkpoint"):
        load_checkpoint(build_model("cifar/resnet20"), tmp_path / "whole.pt")
    assert load_checkpoint(build_model("cifar/resnet20"), tmp_path / "whole.pt", trust=True) == {}
    torch.save({"foo": 1}, tmp_path / "nostate.pt")
    with pytest.raises(SmcpError, match="no state dict found"):
        load_checkpoint(build_model("cifar/resnet20"), tmp_path / "nostate.pt")


def _resnet32_ckpt(tmp_path):
    """A ResNet-32 checkpoint: it has keys (layer1.3 ...) a ResNet-20 lacks."""
    sd = build_model("cifar/resnet32").state_dict()
    p = tmp_path / "r32.pt"
    torch.save(sd, p)
    return p
