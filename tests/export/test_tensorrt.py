"""TensorRT against a stand-in ``tensorrt`` module (tests/fixtures/fake_tensorrt.py, 10.x and 11.x
API) that runs the model with onnxruntime: engine building, the runner, latency tables, whole-model
timing and ``smcp export --trt``.  Latencies are only asserted where the fake injects a delay."""

from __future__ import annotations

import json
import shutil
import sys

import onnx
import pytest
import torch
from conftest import TINY, cli, sets
from fixtures.fake_tensorrt import install
from torch import nn

from smcp_core.errors import SmcpError
from smcp_core.export.onnx import export_onnx
from smcp_core.export.tensorrt import build_model_engine, build_trt_engine, engine_parity, trt_runner
from smcp_core.graph.signature import LayerSig
from smcp_core.profile import trt as profile_trt
from smcp_core.profile.measure import measure_table, single_layer_onnx
from smcp_core.stages.measure import Bench, measure_lowest

CONV = LayerSig("conv", 4, 4, kernel=(3, 3), in_hw=(8, 8))
STRONGLY_TYPED = 1 << 1  # 1 << int(NetworkDefinitionCreationFlag.STRONGLY_TYPED)


class Net(nn.Module):
    def __init__(self, width: int = 8):
        super().__init__()
        self.conv = nn.Conv2d(3, width, 3, padding=1)
        self.bn = nn.BatchNorm2d(width)
        self.fc = nn.Linear(width, 5)

    def forward(self, x):
        x = torch.relu(self.bn(self.conv(x)))
        return self.fc(torch.flatten(nn.functional.adaptive_avg_pool2d(x, 1), 1))


def _net(width: int = 8) -> nn.Module:
    torch.manual_seed(0)
    return Net(width).eval()


@pytest.fixture
def onnx_file(tmp_path):
    p = tmp_path / "layer.onnx"
    model = onnx.load_from_string(single_layer_onnx(CONV, 4, 4))
    model.graph.input[0].type.tensor_type.shape.dim[0].dim_param = "batch"  # dynamic batch
    onnx.save(model, str(p))
    return p


@pytest.fixture
def fake(monkeypatch):
    return lambda version="10.9.0", **kw: install(monkeypatch, version, **kw)


# ------------------------------------------------------------------------------------ missing, no GPU


def test_tensorrt_missing(monkeypatch, onnx_file, tmp_path):
    monkeypatch.setitem(sys.modules, "tensorrt", None)  # `import tensorrt` raises ImportError
    msg = r"^TensorRT is not installed \(no python module tensorrt\): pip install 'smcp\[trt\]'"
    for call in (lambda: build_trt_engine(onnx_file, tmp_path / "m.engine", batch_size=1),
                 lambda: trt_runner(tmp_path / "m.engine", torch.randn(1, 4, 8, 8)),
                 lambda: measure_table([CONV], backend="tensorrt")):
        with pytest.raises(SmcpError, match=msg) as ei:
            call()
        assert "\n" not in str(ei.value)


def test_tensorrt_without_gpu(fake, monkeypatch, onnx_file, tmp_path):
    fake()
    monkeypatch.setattr(profile_trt, "_cuda_available", lambda: False)
    with pytest.raises(SmcpError, match="no CUDA GPU is visible"):
        build_trt_engine(onnx_file, tmp_path / "m.engine", batch_size=1)


# ------------------------------------------------------------------------------------------- building


def test_tensorrt10_fp16_sets_the_builder_flag_and_keeps_the_timing_cache(fake, onnx_file, tmp_path):
    rec = fake("10.9.0")._record
    cache = tmp_path / "timing.cache"
    out = build_trt_engine(onnx_file, tmp_path / "out" / "m.engine", precision="fp16", batch_size=8,
                           dynamic_batch=True, workspace_gb=2, timing_cache=cache)
    assert rec["network_flags"] == [0] and rec["flags_set"] == ["FP16"] and rec["parsed"] == [str(onnx_file)]
    assert rec["pool"][1] == 2 << 30
    assert rec["shapes"] == [("input", (1, 4, 8, 8), (8, 4, 8, 8), (8, 4, 8, 8))] and rec["profiles"] == 1
    assert [f.name for f in out.parent.iterdir()] == ["m.engine"]  # written atomically, no temp left
    assert cache.exists() and rec["cache_hits"] == 0
    build_trt_engine(onnx_file, tmp_path / "m2.engine", precision="fp16", batch_size=8, timing_cache=cache)
    assert rec["cache_hits"] == 1  # the second build found the first one's timings in the file


def test_static_batch_fp32_is_weakly_typed_without_flags_on_10(fake, onnx_file, tmp_path):
    rec = fake("10.9.0")._record
    build_trt_engine(onnx_file, tmp_path / "m.engine", precision="fp32", batch_size=4)
    assert rec["flags_set"] == [] and rec["network_flags"] == [0]
    assert rec["shapes"] == [("input", (4, 4, 8, 8), (4, 4, 8, 8), (4, 4, 8, 8))]


def test_tensorrt11_fp16_builds_a_strongly_typed_network_from_an_fp16_onnx(fake, tmp_path):
    trt = fake("11.0.0")
    assert not hasattr(trt.BuilderFlag, "FP16") and not hasattr(trt.BuilderFlag, "INT8")
    model, x = _net(), torch.randn(2, 3, 16, 16)
    onnx_path = build_model_engine(model, x, tmp_path / "m.engine", precision="fp16")
    assert onnx_path.name == "m.fp16.onnx"
    m = onnx.load(str(onnx_path))
    assert m.graph.input[0].type.tensor_type.elem_type == onnx.TensorProto.FLOAT16
    assert trt._record["network_flags"] == [STRONGLY_TYPED] and trt._record["flags_set"] == []
    assert next(model.parameters()).dtype == torch.float32  # the caller's model is left alone
    run = trt_runner(tmp_path / "m.engine", x)
    assert run.engine.get_tensor_dtype("input") == trt.DataType.HALF
    par = engine_parity(model, tmp_path / "m.engine", x, "fp16")
    assert par["passed"] and par["tolerance"] == 1e-2 and par["max_rel_diff"] < 1e-2


def test_tensorrt10_fp16_from_an_fp32_onnx_uses_the_flag(fake, tmp_path):
    trt = fake("10.9.0")
    model, x = _net(), torch.randn(2, 3, 16, 16)
    onnx_path = build_model_engine(model, x, tmp_path / "m.engine", precision="fp16")
    assert onnx_path.name == "m.onnx" and trt._record["flags_set"] == ["FP16"]
    assert trt._record["network_flags"] == [0]
    assert trt_runner(tmp_path / "m.engine", x).engine.get_tensor_dtype("input") == trt.DataType.FLOAT


def test_build_errors_are_one_line(fake, onnx_file, tmp_path):
    fake(parse_ok=False)
    with pytest.raises(SmcpError, match="cannot parse .*unsupported attribute"):
        build_trt_engine(onnx_file, tmp_path / "m.engine", batch_size=1)
    fake()
    with pytest.raises(SmcpError, match="QuantizeLinear"):
        build_trt_engine(onnx_file, tmp_path / "m.engine", precision="int8", batch_size=1)
    with pytest.raises(SmcpError, match="precision"):
        build_trt_engine(onnx_file, tmp_path / "m.engine", precision="fp8", batch_size=1)
    fake("11.1.0")  # no precision flags: an fp32 ONNX model cannot become an fp16 engine by a flag
    with pytest.raises(SmcpError, match="strongly typed"):
        build_trt_engine(onnx_file, tmp_path / "m.engine", precision="fp16", batch_size=1)
    fake()
    fixed = tmp_path / "fixed.onnx"
    fixed.write_bytes(single_layer_onnx(CONV, 4, 4, batch_size=2))
    with pytest.raises(SmcpError, match="fixed batch"):
        build_trt_engine(fixed, tmp_path / "m.engine", batch_size=1, dynamic_batch=True)
    assert not (tmp_path / "m.engine").exists()


def test_an_engine_of_another_version_is_refused(fake, onnx_file, tmp_path):
    fake("10.9.0")
    build_trt_engine(onnx_file, tmp_path / "m.engine", precision="fp32", batch_size=1)
    fake("10.13.0")
    with pytest.raises(SmcpError, match="another TensorRT version"):
        trt_runner(tmp_path / "m.engine", torch.randn(1, 4, 8, 8))


# -------------------------------------------------------------------------------------------- running


def test_the_runner_binds_buffers_once_and_gives_real_outputs(fake, tmp_path):
    rec = fake()._record
    model, x = _net(), torch.randn(3, 3, 16, 16)
    build_model_engine(model, x, tmp_path / "m.engine", precision="fp32")
    run = trt_runner(tmp_path / "m.engine", x)
    ptr = run.outputs["output"].data_ptr()
    for _ in range(3):
        out = run()
    run.sync()
    assert out is run.outputs and out["output"].data_ptr() == ptr and rec["executions"] == 3
    assert rec["streams"] == [0, 0, 0]  # no CUDA here: synchronous, stream handle 0
    with torch.inference_mode():
        assert torch.allclose(out["output"], model(x), atol=1e-5)
    par = engine_parity(model, tmp_path / "m.engine", x, "fp32")
    assert par["passed"] and par["max_abs_diff"] < 1e-5 and par["top1_agree"] == 1.0


@pytest.mark.gpu
def test_a_runner_on_cuda_enqueues_on_the_current_stream(monkeypatch, tmp_path):
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    rec = install(monkeypatch, cuda_buffers=True, run_model=False)._record
    x = torch.randn(2, 3, 16, 16)
    build_model_engine(_net(), x, tmp_path / "m.engine", precision="fp32")
    run = trt_runner(tmp_path / "m.engine", x)
    assert run.outputs["output"].is_cuda
    s = torch.cuda.Stream()
    with torch.cuda.stream(s):
        run()
    assert rec["streams"][-1] == s.cuda_stream


# --------------------------------------------------------------------------------------- latency table


def test_measure_table_on_tensorrt_builds_one_engine_per_point(fake, tmp_path):
    rec = fake(delay=0.001)._record
    cache = tmp_path / "trt.cache"
    kw = dict(backend="tensorrt", device="cuda", channel_step=2, warmup=1, min_runs=3, max_runs=3,
              trt_timing_cache=cache)
    table = measure_table([CONV], **kw)
    n = len(table.entries[CONV.key()].points())
    assert table.complete and table.backend == "tensorrt" and rec["builds"] == n == 4
    assert all(v >= 1.0 for _, _, v in table.entries[CONV.key()].points())  # the injected 1 ms
    assert cache.exists()
    measure_table([CONV], **kw)
    assert rec["cache_hits"] == n  # every layer engine of the second table found its timings


def test_measure_table_on_tensorrt11_fp16_times_fp16_engines(fake):
    rec = fake("11.0.0")._record
    table = measure_table([CONV], backend="tensorrt", device="cuda", dtype="float16", channel_step=4,
                          warmup=1, min_runs=2, max_runs=2)
    assert table.dtype == "float16" and rec["builds"] >= 1
    assert set(rec["network_flags"]) == {STRONGLY_TYPED} and rec["flags_set"] == []


def test_measure_table_on_tensorrt_refuses_nhwc(fake):
    fake()
    with pytest.raises(SmcpError, match="NCHW"):
        measure_table([CONV], backend="tensorrt", device="cuda", layout="nhwc")


# ------------------------------------------------------------------------------- whole-model timing


def _bench(**kw):
    from smcp_core.config.recipe import ProfileConfig

    prof = ProfileConfig(backend="tensorrt", device="cuda", warmup=2, **kw)
    return Bench(prof, torch.randn(1, 3, 16, 16))


def test_whole_models_are_timed_as_engines_and_reused_between_loops(fake, tmp_path):
    delays = {"big": 0.004, "small": 0.001}
    rec = fake(delay=lambda info: delays[next(k for k in delays if f"/{k}." in info["onnx"])])._record
    models = {"big": _net(16), "small": _net(4)}
    meas = measure_lowest(models, _bench(batch_size=2), workdir=tmp_path / "tmp", repeats=2, min_runs=5,
                          max_seconds=10)
    st = meas["stats"]
    assert st["big"]["median_ms"] > 4.0 > st["small"]["median_ms"] > 1.0
    assert rec["builds"] == 2  # one engine per model; the second loop reuses them
    assert (tmp_path / "trt_timing.cache").exists() and not (tmp_path / "tmp").exists()


# ---------------------------------------------------------------------------------------- smcp export


EXPORT = ["export.batch_size=4", "export.min_runs=6", "export.max_seconds=20", "export.trt_precision=fp16"]


@pytest.fixture(scope="module")
def slim_run(tmp_path_factory):
    """A run directory with a slim model (the tiny quickstart, FLOPs target: nothing timed)."""
    out = tmp_path_factory.mktemp("trt") / "run"
    for cmd in ("prune", "slim"):
        code, _, err = cli(cmd, "--out", out, *sets(TINY), "--quiet")
        assert code == 0, err[-2000:]
    return out


def _export(slim_run, tmp_path, monkeypatch, target: float, version: str = "10.9.0", extra=()):
    run = tmp_path / "run"
    shutil.copytree(slim_run, run)
    # the baseline engine takes 80 ms a call, the pruned one 40 ms (more than the model's run): 2x
    install(monkeypatch, version, delay=lambda info: 0.08 if "baseline" in info["onnx"] else 0.04)
    code, out, err = cli("export", "--trt", "--out", run,
                         *sets(TINY + EXPORT + [f"export.target.speedup={target}", *extra]), "--json", "--quiet")
    return code, json.loads(out), err, run


@pytest.mark.slow
def test_export_trt_times_both_engines_and_reports_fps(slim_run, tmp_path, monkeypatch):
    code, doc, err, run = _export(slim_run, tmp_path, monkeypatch, target=1.3)
    assert code == 0, err[-3000:]
    rep = json.loads((run / "export" / "report.json").read_text())
    t = rep["tensorrt"]
    assert rep["backend"] == "tensorrt" and rep["passed"] and doc["ok"]
    assert rep["dtype"] == "float16" and rep["environment"]["precision"] == "float16"
    assert rep["environment"]["layout"] == "nchw"
    assert t["precision"] == "fp16" and t["version"] == "10.9.0" and t["batch_size"] == 4
    for side, ms in (("baseline", 80.0), ("pruned", 40.0)):
        lat = t[side]["latency_ms"]
        assert ms <= lat["p50"] <= lat["p90"] <= lat["p99"]
        assert t[side]["fps"] == pytest.approx(4 / (lat["p50"] / 1e3))
        assert (run / "export" / t[side]["engine"].rsplit("/", 1)[-1]).exists()
    assert t["pruned"]["fps"] > t["baseline"]["fps"]
    assert t["parity"]["passed"] and t["parity"]["tolerance"] == 1e-2
    assert rep["gate"]["verdict"]["passed"] and rep["gate"]["rounds"] >= 6
    assert rep["files"]["engine"].endswith("model.engine") and (run / "export" / "timing.cache").exists()
    assert rep["files"]["baseline_engine"].endswith("baseline.engine")


@pytest.mark.slow
def test_export_trt_missing_the_target_exits_2(slim_run, tmp_path, monkeypatch):
    code, doc, err, run = _export(slim_run, tmp_path, monkeypatch, target=5.0)
    assert code == 2, err[-3000:]
    assert doc["ok"] is False and doc["exit_code"] == 2 and "target missed" in doc["error"]
    rep = json.loads((run / "export" / "report.json").read_text())
    assert not rep["passed"] and rep["gate"]["verdict"]["decided_by"] == "interval"
    assert rep["tensorrt"]["pruned"]["fps"] > 0


@pytest.mark.slow
def test_export_trt11_fp16_times_strongly_typed_engines_of_fp16_onnx(slim_run, tmp_path, monkeypatch):
    code, doc, err, run = _export(slim_run, tmp_path, monkeypatch, target=1.3, version="11.0.0")
    assert code == 0, err[-3000:]
    fake = sys.modules["tensorrt"]
    assert set(fake._record["network_flags"]) == {STRONGLY_TYPED} and fake._record["flags_set"] == []
    assert (run / "export" / "model.fp16.onnx").exists() and (run / "export" / "baseline.fp16.onnx").exists()
    assert doc["tensorrt"]["version"] == "11.0.0" and doc["dtype"] == "float16"


@pytest.mark.slow
def test_export_report_dtype_is_what_was_timed(slim_run, tmp_path, monkeypatch):
    code, doc, err, _ = _export(slim_run, tmp_path, monkeypatch, target=1.3, extra=["export.trt_precision=fp32"])
    assert code == 0, err[-3000:]
    assert doc["dtype"] == "float32" and doc["tensorrt"]["parity"]["tolerance"] == 1e-3
    from smcp_core.config.recipe import load_recipe
    from smcp_core.stages.exporting import _timed_precision

    r = load_recipe("quickstart", TINY + ["profile.backend=torch", "profile.dtype=float16",
                                          "profile.layout=channels_last"])
    assert _timed_precision(r, "torch") == ("float16", "channels_last")
    assert _timed_precision(r, "onnxruntime") == ("float32", "nchw")


def test_export_fp16_onnx_leaves_the_model_alone(tmp_path):
    model = _net()
    p = export_onnx(model, torch.randn(2, 3, 16, 16), tmp_path / "h.onnx", dtype="float16")
    assert onnx.load(str(p)).graph.input[0].type.tensor_type.elem_type == onnx.TensorProto.FLOAT16
    assert next(model.parameters()).dtype == torch.float32
    with pytest.raises(SmcpError, match="float32 or float16"):
        export_onnx(model, torch.randn(2, 3, 16, 16), tmp_path / "b.onnx", dtype="int4")


@pytest.mark.slow
def test_profile_on_tensorrt_times_layer_and_whole_model_engines(tmp_path, monkeypatch):
    rec = install(monkeypatch)._record
    run = tmp_path / "run"
    code, _, err = cli("profile", "--out", run, *sets(TINY + [
        "profile.backend=tensorrt", "profile.device=cuda", "profile.channel_step=16", "profile.min_runs=3",
        "profile.warmup=1", "profile.max_seconds=60", "profile.batch_size=2"]), "--quiet")
    assert code == 0, err[-3000:]
    table = json.loads((run / "latency.json").read_text())
    assert table["meta"]["backend"] == "tensorrt" and table["meta"]["complete"]
    points = {p["name"] for p in table["model"]["calibration"]["points"]}
    assert {"baseline", "uniform75", "uniform50"} <= points  # the calibration timed engines too
    assert rec["builds"] > len(table["entries"]) and (run / "trt_timing.cache").exists()
    assert not (run / ".profile_tmp").exists()


RN50_SYNTHETIC = ["data.source=synthetic", "data.path=null", "model.checkpoint=null"]


@pytest.mark.parametrize("with_fake", [False, True], ids=["no-tensorrt", "tensorrt-without-gpu"])
def test_rn50_fps2x_on_a_machine_without_cuda_stops_with_one_line(with_fake, monkeypatch, tmp_path):
    if torch.cuda.is_available():
        pytest.skip("needs a machine without CUDA")
    if with_fake:
        install(monkeypatch)
        monkeypatch.setattr(profile_trt, "_cuda_available", lambda: False)
    else:
        monkeypatch.setitem(sys.modules, "tensorrt", None)  # `import tensorrt` raises ImportError
    code, _, err = cli("run", "-r", "rn50_fps2x", "--out", tmp_path / "run", *sets(RN50_SYNTHETIC))
    lines = [ln for ln in err.strip().splitlines() if ln.startswith("error:")]
    assert code == 1 and len(lines) == 1 and "Traceback" not in err, err[-2000:]
    assert ("no CUDA GPU is visible" if with_fake else "TensorRT is not installed") in lines[0]
    assert "pip install 'smcp[trt]'" in lines[0]
    assert not (tmp_path / "run" / "latency.json").exists()


def test_rn50_fps2x_profile_settings_are_measurable_on_tensorrt(monkeypatch):
    # the shipped recipe's profile section must pass the table's own checks on a TensorRT machine
    from smcp_core.config.recipe import load_recipe
    from smcp_core.profile.measure import _checked_settings

    install(monkeypatch)
    p = load_recipe("rn50_fps2x", ["data.path=/x"]).profile
    assert _checked_settings(p.backend, p.dtype, p.layout, p.batch_size, p.channel_step) == ("float16", "nchw", 256)
