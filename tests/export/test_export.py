"""ONNX export + parity, and TensorRT engine building against a fake ``tensorrt`` module."""

from __future__ import annotations

import sys
import types

import numpy as np
import onnx
import pytest
import torch
from torch import nn

from smcp_core.errors import SmcpError
from smcp_core.export import tensorrt as export_tensorrt
from smcp_core.export.onnx import export_onnx, onnx_parity
from smcp_core.export.tensorrt import build_trt_engine, trt_runner
from smcp_core.graph.signature import LayerSig
from smcp_core.profile import timing as profile_timing
from smcp_core.profile.measure import single_layer_onnx


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


def test_parity_missing_file(tmp_path):
    with pytest.raises(SmcpError, match="does not exist"):
        onnx_parity(_net(), tmp_path / "nope.onnx", torch.randn(1, 3, 16, 16))


# ---------------------------------------------------------------------------------------------------
# TensorRT
# ---------------------------------------------------------------------------------------------------


@pytest.fixture
def onnx_file(tmp_path):
    p = tmp_path / "layer.onnx"
    model = onnx.load_from_string(single_layer_onnx(LayerSig("conv", 4, 4, kernel=(3, 3), in_hw=(8, 8)), 4, 4))
    model.graph.input[0].type.tensor_type.shape.dim[0].dim_param = "batch"  # dynamic batch
    onnx.save(model, str(p))
    return p


def test_tensorrt_missing(monkeypatch, onnx_file, tmp_path):
    monkeypatch.setitem(sys.modules, "tensorrt", None)  # `import tensorrt` raises ImportError
    msg = r"TensorRT is not installed: pip install 'smcp\[trt\]' on a machine with an NVIDIA GPU and driver"
    with pytest.raises(SmcpError, match=msg):
        build_trt_engine(onnx_file, tmp_path / "m.engine", batch_size=1)
    with pytest.raises(SmcpError, match=msg):
        trt_runner(tmp_path / "m.engine", torch.randn(1, 4, 8, 8))


def test_tensorrt_without_gpu(monkeypatch, onnx_file, tmp_path):
    fake, _ = _fake_tensorrt()
    monkeypatch.setitem(sys.modules, "tensorrt", fake)
    monkeypatch.setattr(export_tensorrt, "_cuda_available", lambda: False)
    with pytest.raises(SmcpError, match="NVIDIA GPU"):
        build_trt_engine(onnx_file, tmp_path / "m.engine", batch_size=1)


def _fake_tensorrt(*, version="10.9.0", precision_flags=True, parse_ok=True, input_shape=(-1, 4, 8, 8)):
    """A stand-in for the TensorRT Python module that records the builder calls made on it."""
    rec: dict = {"flags_set": [], "profiles": [], "shapes": []}
    trt = types.ModuleType("tensorrt")
    trt.__version__ = version

    class Logger:
        WARNING = "WARNING"

        def __init__(self, severity):
            rec["logger"] = severity

    class Input:
        name = "input"
        shape = input_shape

    class Network:
        num_inputs = 1

        def get_input(self, i):
            return Input()

    class Profile:
        def set_shape(self, name, mn, opt, mx):
            rec["shapes"].append((name, tuple(mn), tuple(opt), tuple(mx)))

    class TimingCache:
        def __init__(self, blob):
            self.blob = blob

        def serialize(self):
            return b"CACHE:" + self.blob

    class Config:
        def set_memory_pool_limit(self, pool, size):
            rec["pool"] = (pool, size)

        def set_flag(self, flag):
            rec["flags_set"].append(flag)

        def add_optimization_profile(self, p):
            rec["profiles"].append(p)
            return 0

        def create_timing_cache(self, blob):
            rec["cache_in"] = bytes(blob)
            return TimingCache(bytes(blob))

        def set_timing_cache(self, cache, ignore_mismatch):
            self._cache = cache
            return True

        def get_timing_cache(self):
            return self._cache

    class Builder:
        def __init__(self, logger):
            rec["builder_logger"] = logger

        def create_network(self, flags):
            rec["network_flags"] = flags
            return Network()

        def create_builder_config(self):
            return Config()

        def create_optimization_profile(self):
            return Profile()

        def build_serialized_network(self, network, config):
            rec["built"] = True
            return bytearray(b"FAKE-ENGINE")

    class OnnxParser:
        num_errors = 0 if parse_ok else 1

        def __init__(self, network, logger):
            pass

        def parse_from_file(self, path):
            rec["parsed"] = path
            return parse_ok

        def get_error(self, i):
            return "In node 3 (Conv): unsupported attribute"

    trt.Logger = Logger
    trt.Builder = Builder
    trt.OnnxParser = OnnxParser
    trt.MemoryPoolType = types.SimpleNamespace(WORKSPACE="WORKSPACE")
    trt.BuilderFlag = types.SimpleNamespace(FP16="FP16", INT8="INT8") if precision_flags else types.SimpleNamespace()
    return trt, rec


@pytest.fixture
def fake_trt(monkeypatch):
    def install(**kw):
        fake, rec = _fake_tensorrt(**kw)
        monkeypatch.setitem(sys.modules, "tensorrt", fake)
        monkeypatch.setattr(export_tensorrt, "_cuda_available", lambda: True)
        return rec

    return install


def test_build_trt_engine_with_fake_tensorrt(fake_trt, onnx_file, tmp_path):
    rec = fake_trt()
    cache = tmp_path / "timing.cache"
    cache.write_bytes(b"old")
    out = build_trt_engine(
        onnx_file, tmp_path / "out" / "m.engine", precision="fp16", batch_size=8, dynamic_batch=True, workspace_gb=2,
        timing_cache=cache,
    )
    assert out.read_bytes() == b"FAKE-ENGINE"
    assert rec["network_flags"] == 0 and rec["parsed"] == str(onnx_file) and rec["built"]
    assert rec["pool"] == ("WORKSPACE", 2 << 30)
    assert rec["flags_set"] == ["FP16"]
    assert rec["shapes"] == [("input", (1, 4, 8, 8), (8, 4, 8, 8), (8, 4, 8, 8))]
    assert len(rec["profiles"]) == 1
    assert rec["cache_in"] == b"old" and cache.read_bytes() == b"CACHE:old"
    assert [f.name for f in out.parent.iterdir()] == ["m.engine"]


def test_build_trt_engine_static_batch_and_fp32(fake_trt, onnx_file, tmp_path):
    rec = fake_trt()
    build_trt_engine(onnx_file, tmp_path / "m.engine", precision="fp32", batch_size=4)
    assert rec["flags_set"] == []
    assert rec["shapes"] == [("input", (4, 4, 8, 8), (4, 4, 8, 8), (4, 4, 8, 8))]


def test_build_trt_engine_errors(fake_trt, onnx_file, tmp_path):
    fake_trt(parse_ok=False)
    with pytest.raises(SmcpError, match="cannot parse .*unsupported attribute"):
        build_trt_engine(onnx_file, tmp_path / "m.engine", batch_size=1)
    fake_trt()
    with pytest.raises(SmcpError, match="QuantizeLinear"):
        build_trt_engine(onnx_file, tmp_path / "m.engine", precision="int8", batch_size=1)
    with pytest.raises(SmcpError, match="precision"):
        build_trt_engine(onnx_file, tmp_path / "m.engine", precision="fp8", batch_size=1)
    # TensorRT 11: no precision flags; an fp32 ONNX model cannot become an fp16 engine by a flag
    fake_trt(version="11.1.0", precision_flags=False)
    with pytest.raises(SmcpError, match="strongly typed"):
        build_trt_engine(onnx_file, tmp_path / "m.engine", precision="fp16", batch_size=1)
    fake_trt(input_shape=(2, 4, 8, 8))
    with pytest.raises(SmcpError, match="fixed batch"):
        build_trt_engine(onnx_file, tmp_path / "m.engine", batch_size=1, dynamic_batch=True)
    assert not (tmp_path / "m.engine").exists()
