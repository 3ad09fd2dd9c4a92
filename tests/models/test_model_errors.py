"""Bad models and checkpoints give one line naming the real cause (issue 17): a model that returns a
dict or tuple, a directory / truncated file / NaN weights given as the checkpoint."""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest
import torch
from conftest import cli
from torch import nn

from smcp_core.errors import SmcpError
from smcp_core.models import build_model, check_logits, load_checkpoint

USER_MODELS = textwrap.dedent("""
    import collections

    import torch
    from torch import nn


    class Net(nn.Module):
        def __init__(self, out="tensor", num_classes=10):
            super().__init__()
            self.out = out
            self.conv = nn.Conv2d(3, 8, 3, padding=1)
            self.fc = nn.Linear(8, num_classes)

        def forward(self, x):
            y = self.fc(self.conv(x).mean((2, 3)))
            if self.out == "dict":
                return {"logits": y, "features": x}
            if self.out == "tuple":
                return y, x
            if self.out == "namedtuple":
                return collections.namedtuple("Out", "logits aux")(y, y)
            if self.out == "noisy":
                return y + torch.randn_like(y)
            return y


    class Fixed64(nn.Module):
        # only runs on 64x64 inputs: the probe's guesses (32, 224) fail and are not reported
        def __init__(self, num_classes=10):
            super().__init__()
            self.conv = nn.Conv2d(3, 4, 3, padding=1)
            self.fc = nn.Linear(4 * 64 * 64, num_classes)

        def forward(self, x):
            return {"logits": self.fc(self.conv(x).flatten(1))}


    class Lazy(nn.Module):
        def __init__(self, num_classes=10):
            super().__init__()
            self.fc = nn.LazyLinear(num_classes)

        def forward(self, x):
            return {"logits": self.fc(x.flatten(1))}


    def build(out="tensor", num_classes=10):
        return Net(out, num_classes)
""")


@pytest.fixture
def user_file(tmp_path) -> Path:
    path = tmp_path / "user_models.py"
    path.write_text(USER_MODELS)
    return path


def one_line(info: pytest.ExceptionInfo) -> str:
    msg = str(info.value)
    assert msg and "\n" not in msg and "Traceback" not in msg, repr(msg)
    return msg


# ------------------------------------------------------------------------------------- model output


@pytest.mark.parametrize("out, kind", [("dict", "returns a dict (keys 'logits', 'features')"),
                                       ("tuple", "returns a tuple of 2"),
                                       ("namedtuple", "returns a namedtuple Out (logits, aux)")])
def test_model_returning_non_tensor_is_one_line_at_build(user_file, out, kind):
    source = f"{user_file}:build"
    with pytest.raises(SmcpError) as info:
        build_model(source, kwargs={"out": out})
    msg = one_line(info)
    assert msg.startswith(f"model {source} {kind}"), msg
    assert "smcp needs a tensor of logits" in msg and "wrap it" in msg, msg


def test_tensor_model_builds_and_probe_leaves_state(user_file):
    namespace: dict = {}
    exec(compile(USER_MODELS, str(user_file), "exec"), namespace)  # noqa: S102 - the test's own code
    torch.manual_seed(0)
    direct = namespace["build"]("noisy")
    after_direct = torch.random.get_rng_state()
    torch.manual_seed(0)
    model = build_model(f"{user_file}:build", kwargs={"out": "noisy"})
    assert torch.equal(torch.random.get_rng_state(), after_direct)  # the probe's randn_like did not count
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), direct.state_dict().values()))
    assert model.training  # as the factory returned it


def test_probe_does_not_guess_wrong(user_file):
    # a wrong input guess is not an error at build time (the channel graph runs the real input)
    assert isinstance(build_model(f"{user_file}:Fixed64"), nn.Module)
    lazy = build_model(f"{user_file}:Lazy")
    assert isinstance(lazy.fc, nn.modules.lazy.LazyModuleMixin)  # never materialised by a guess


def test_check_logits():
    check_logits(torch.zeros(2, 3), "m")
    with pytest.raises(SmcpError, match="model m returns None; smcp needs a tensor of logits"):
        check_logits(None, "m")
    with pytest.raises(SmcpError, match="returns a list of 1"):
        check_logits([torch.zeros(1)], "m")


def test_cli_inspect_dict_model_exit_1(user_file):
    code, out, err = cli("inspect", f"{user_file}:build", "--input-size", "3,32,32",
                         "--set", "model.kwargs={out: dict}")
    assert code == 1, (code, out, err)
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert len(lines) == 1 and "returns a dict" in lines[0] and "Traceback" not in err, err


# -------------------------------------------------------------------------------------- checkpoints


@pytest.fixture
def resnet20_ckpt(tmp_path) -> Path:
    path = tmp_path / "r20.pt"
    torch.save(build_model("cifar/resnet20").state_dict(), path)
    return path


def test_checkpoint_directory(tmp_path, resnet20_ckpt):
    with pytest.raises(SmcpError) as info:
        load_checkpoint(build_model("cifar/resnet20"), tmp_path)
    msg = one_line(info)
    assert "is a directory, not a file" in msg and "r20.pt" in msg and "not found" not in msg, msg
    empty = tmp_path / "empty_dir"
    empty.mkdir()
    with pytest.raises(SmcpError) as info:
        load_checkpoint(build_model("cifar/resnet20"), empty)
    assert "is a directory" in one_line(info)


@pytest.mark.parametrize("keep", [0.02, 0.5, 0.999])
def test_truncated_checkpoint(tmp_path, resnet20_ckpt, keep):
    raw = resnet20_ckpt.read_bytes()
    cut = tmp_path / "cut.pt"
    cut.write_bytes(raw[: int(len(raw) * keep)])
    with pytest.raises(SmcpError) as info:
        load_checkpoint(build_model("cifar/resnet20"), cut)
    msg = one_line(info).replace(str(cut), "")
    assert "truncated" in msg and "not a PyTorch checkpoint" not in msg, msg


def test_truncated_legacy_checkpoint(tmp_path):
    path = tmp_path / "legacy.pt"
    torch.save(build_model("cifar/resnet20").state_dict(), path, _use_new_zipfile_serialization=False)
    raw = path.read_bytes()
    path.write_bytes(raw[: len(raw) // 2])
    with pytest.raises(SmcpError) as info:
        load_checkpoint(build_model("cifar/resnet20"), path)
    assert "truncated" in one_line(info).replace(str(path), "")  # the path names the test


@pytest.mark.parametrize("key, value, word", [("conv1.weight", float("nan"), "NaN"),
                                              ("bn1.running_var", float("inf"), "Inf")])
def test_non_finite_checkpoint(tmp_path, key, value, word):
    sd = {k: v.clone() for k, v in build_model("cifar/resnet20").state_dict().items()}
    sd[key].view(-1)[0] = value
    path = tmp_path / "bad.pt"
    torch.save({"state_dict": sd, "epoch": 3}, path)
    model = build_model("cifar/resnet20")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(SmcpError) as info:
        load_checkpoint(model, path)
    msg = one_line(info)
    assert key in msg and word in msg and "(1 of" in msg, msg
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())  # nothing loaded


def test_good_checkpoint_still_loads(resnet20_ckpt):
    assert load_checkpoint(build_model("cifar/resnet20"), resnet20_ckpt) == {}
