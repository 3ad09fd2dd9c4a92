"""`smcp inspect` reports the whole model's params and MACs, with the share the channel graph
understood beside them (a model with parts the graph does not understand is larger than that share)."""

from __future__ import annotations

import json

import pytest
from conftest import cli

MIXER = '''
import torch
from torch import nn


class SpatialMixer(nn.Module):
    """Mixes the spatial positions of every channel with a learned (hw x hw) matrix: a matmul with a
    weight that the channel graph does not understand (it freezes the channels around it)."""

    def __init__(self, hw):
        super().__init__()
        self.w = nn.Parameter(torch.randn(hw, hw) * 0.05)

    def forward(self, x):
        b, c, h, w = x.shape
        return (x.flatten(2) @ self.w).reshape(b, c, h, w)


def build(num_classes=10):
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), SpatialMixer(64),
                         nn.Conv2d(8, 16, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                         nn.Linear(16, num_classes))
'''


@pytest.fixture
def mixer(tmp_path):
    f = tmp_path / "mixer.py"
    f.write_text(MIXER)
    return f


def _build(f):
    import importlib.util

    spec = importlib.util.spec_from_file_location("mixer_for_test", f)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod.build(10)


def test_inspect_json_counts_the_whole_model(mixer):
    code, out, err = cli("inspect", f"{mixer}:build", "--input-size", "3,8,8", "--num-classes", "10", "--json")
    assert code == 0, err
    d = json.loads(out)
    model = _build(mixer)
    total = sum(p.numel() for p in model.parameters())
    hw = 64
    macs = 3 * 8 * 9 * hw + 8 * hw * hw + 8 * 16 * 9 * hw + 16 * 10  # conv, mixer matmul, conv, linear
    assert d["params"] == total == 5674
    assert d["flops"] == macs  # MACs of one sample, whole model
    assert d["graph_params"] == total - 64 * 64  # the mixer's weight is not understood
    assert d["graph_flops"] == macs - 8 * hw * hw
    assert 0 < d["graph_params_share"] < 1 and 0 < d["graph_flops_share"] < 1
    assert d["graph_params_share"] == pytest.approx(d["graph_params"] / total)
    assert any("matmul" in s for s in d["frozen_spots"])


def test_inspect_table_shows_whole_model_and_understood_share(mixer):
    code, out, err = cli("inspect", f"{mixer}:build", "--input-size", "3,8,8", "--num-classes", "10")
    assert code == 0, err
    text = " ".join(err.split())  # rich wraps at the terminal width
    assert "5,674 params, 0.1 MMAC" in text
    assert "whole model: 5,674 params" in text
    assert "the channel graph understands 1,578 params (27.8 %) and 0.1 MMAC (72.8 %)" in text


def test_inspect_fully_understood_model_is_100_percent():
    code, out, err = cli("inspect", "cifar/resnet20", "--json")
    assert code == 0, err
    d = json.loads(out)
    from smcp_core.models.cifar_resnet import cifar_resnet

    assert d["params"] == sum(p.numel() for p in cifar_resnet("resnet20", num_classes=10).parameters())
    assert d["graph_params_share"] == 1.0 and d["graph_flops_share"] == 1.0


def test_inspect_timm_levit_whole_model(tmp_path):
    from smcp_core.utils.tv import import_torchvision

    import_torchvision()
    timm = pytest.importorskip("timm")
    f = tmp_path / "levit.py"
    f.write_text("from smcp_core.utils.tv import import_torchvision\nimport_torchvision()\nimport timm\n\n\n"
                 "def build(num_classes=1000):\n"
                 "    return timm.create_model('levit_128s', pretrained=False, num_classes=num_classes)\n")
    code, out, err = cli("inspect", f"{f}:build", "--json")
    assert code == 0, err
    d = json.loads(out)
    model = timm.create_model("levit_128s", pretrained=False, num_classes=1000)
    assert d["params"] == sum(p.numel() for p in model.parameters())
    assert d["params"] > 7_000_000 and d["flops"] > 250_000_000  # levit_128s: 7.8 M params, 305 MMAC
    assert d["graph_params_share"] < 0.5 and d["graph_flops_share"] < 0.5
