"""ONNX export + parity (TensorRT: tests/export/test_tensorrt.py)."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
import torch
from torch import nn

from smcp_core.errors import SmcpError
from smcp_core.export.onnx import export_onnx, onnx_parity
from smcp_core.profile import timing as profile_timing


class SmallNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(8)
        self.dw = nn.Conv2d(8, 8, 3, stride=2, padding=1, groups=8)
        self.conv2 = nn.Conv2d(8, 16, 1)
        self.fc = nn.Linear(16, 5)

    def forward(self, x):
        x = torch.relu(self.bn1(self.conv1(x)))
        x = torch.relu(self.conv2(self.dw(x)))
        return self.fc(torch.flatten(nn.functional.adaptive_avg_pool2d(x, 1), 1))


def _net() -> nn.Module:
    torch.manual_seed(0)
    m = SmallNet()
    with torch.no_grad():  # non-trivial BN statistics
        m.bn1.running_mean.uniform_(-0.5, 0.5)
        m.bn1.running_var.uniform_(0.5, 2.0)
    return m.eval()


def _run_ort(path, x: np.ndarray) -> np.ndarray:
    sess = profile_timing.ort_session(path)
    return sess.run(None, {"input": x})[0]


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    d = tmp_path_factory.mktemp("onnx")
    model = _net()
    model.train()  # export must switch to eval and restore this
    p = export_onnx(model, torch.randn(1, 3, 16, 16), d / "model.onnx")
    assert model.training
    model.eval()
    return model, p


def test_export_onnx_conv_net(exported):
    model, p = exported
    assert p.exists() and [f.name for f in p.parent.iterdir()] == ["model.onnx"]  # single file, no temp left
    m = onnx.load(str(p))
    assert [i.name for i in m.graph.input] == ["input"]
    assert [o.name for o in m.graph.output] == ["output"]
    batch_dim = m.graph.input[0].type.tensor_type.shape.dim[0]
    assert batch_dim.dim_param and not batch_dim.dim_value  # symbolic batch
    assert not any(t.data_location == onnx.TensorProto.EXTERNAL for t in m.graph.initializer)


def test_parity_and_dynamic_batch(exported):
    model, p = exported
    x = torch.randn(4, 3, 16, 16)
    par = onnx_parity(model, p, x)
    assert par["max_abs_diff"] < 1e-4
    assert par["max_rel_diff"] < 1e-4
    assert par["top1_agree"] == 1.0 and par["n"] == 4 and par["output_shape"] == [4, 5]
    for b in (1, 3):
        xb = torch.randn(b, 3, 16, 16)
        out = _run_ort(p, xb.numpy())
        assert out.shape == (b, 5)
        with torch.inference_mode():
            assert np.abs(out - model(xb).numpy()).max() < 1e-4


def test_export_fx_graph_module(tmp_path):
    model = _net()
    gm = torch.fx.symbolic_trace(model)
    p = export_onnx(gm, torch.randn(2, 3, 16, 16), tmp_path / "gm.onnx")
    par = onnx_parity(gm, p, torch.randn(3, 3, 16, 16))
    assert par["max_abs_diff"] < 1e-4 and par["top1_agree"] == 1.0
    assert _run_ort(p, np.random.randn(1, 3, 16, 16).astype(np.float32)).shape == (1, 5)


def test_export_fixed_batch(tmp_path):
    m = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU()).eval()
    p = export_onnx(m, torch.randn(1, 3, 8, 8), tmp_path / "fixed.onnx", dynamic_batch=False)
    dims = onnx.load(str(p)).graph.input[0].type.tensor_type.shape.dim
    assert [d.dim_value for d in dims] == [1, 3, 8, 8]
    assert onnx_parity(m, p, torch.randn(1, 3, 8, 8))["max_abs_diff"] < 1e-5


def test_export_failure_is_one_line_smcp_error(tmp_path):
    class Broken(nn.Module):
        def forward(self, x):
            raise RuntimeError("boom: this model cannot be traced")

    with pytest.raises(SmcpError, match="boom") as ei:
        export_onnx(Broken(), torch.randn(2, 3), tmp_path / "broken.onnx")
    assert "\n" not in str(ei.value)
    assert list(tmp_path.iterdir()) == []  # no partial output, no temp file


def test_a_failed_dynamo_export_falls_back_to_the_legacy_exporter_with_a_warning(tmp_path, monkeypatch):
    import smcp_core.export.onnx as onnx_mod

    def no_dynamo(*a, **kw):
        raise RuntimeError("dynamo cannot trace this")

    monkeypatch.setattr(onnx_mod, "_export_dynamo", no_dynamo)
    m = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU()).train()
    with pytest.warns(RuntimeWarning, match="dynamo cannot trace this.*legacy") as rec:
        p = export_onnx(m, torch.randn(1, 3, 8, 8), tmp_path / "legacy.onnx")
    assert rec[0].filename == __file__, "the warning points at the caller of export_onnx"
    assert m.training, "the caller's train mode is restored"
    assert onnx_parity(m.eval(), p, torch.randn(3, 3, 8, 8))["max_abs_diff"] < 1e-5

    def no_legacy(*a, **kw):
        raise ValueError("legacy cannot either")

    monkeypatch.setattr(onnx_mod, "_export_legacy", no_legacy)
    with pytest.raises(SmcpError, match="dynamo cannot trace this \\(legacy exporter: legacy cannot either\\)"):
        export_onnx(m, torch.randn(1, 3, 8, 8), tmp_path / "none.onnx")
    assert sorted(f.name for f in tmp_path.iterdir()) == ["legacy.onnx"]  # no partial output, no temp file


def test_parity_missing_file(tmp_path):
    with pytest.raises(SmcpError, match="does not exist"):
        onnx_parity(_net(), tmp_path / "nope.onnx", torch.randn(1, 3, 16, 16))
