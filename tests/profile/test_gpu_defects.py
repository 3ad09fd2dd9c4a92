"""Issue 15's GPU defects, checked on the CPU where they can be (GPU-only checks are marked and skip
without CUDA): the torch runner times a copy, onnxruntime's silent CPU fallback is refused, cuDNN
settings are recorded, CUDA fingerprints ignore the host's CPUs and visible GPU count, torchrun ranks
get their own GPU, and a larger channel step never gives a larger grid."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

from smcp_core.errors import SmcpError
from smcp_core.profile import fingerprint as fpr
from smcp_core.profile import timing
from smcp_core.profile.table import MAX_GRID_POINTS, channel_grid
from smcp_core.utils import dist


def _needs_cuda():
    if not torch.cuda.is_available():
        pytest.skip("no CUDA GPU")


def _small_net() -> nn.Module:
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 4, 1))


# ---------------------------------------------------------------- D2: the runner times a copy


def test_torch_runner_leaves_the_callers_model_as_it_was():
    model = _small_net().train()
    run = timing.torch_runner(model, torch.randn(2, 3, 8, 8), dtype="bfloat16", channels_last=True)
    assert run().dtype == torch.bfloat16
    assert all(p.dtype == torch.float32 and p.device.type == "cpu" for p in model.parameters())
    assert model.training and model[0].weight.is_contiguous()
    model.eval()
    model(torch.randn(1, 3, 8, 8))  # still runs float32 CPU inputs, as the accuracy evaluation does


@pytest.mark.gpu
def test_torch_runner_on_cuda_keeps_the_model_on_the_cpu_and_turns_the_autotuner_on():
    _needs_cuda()
    model = _small_net()
    run = timing.torch_runner(model, torch.randn(2, 3, 8, 8), device="cuda", dtype="float16")
    assert run().device.type == "cuda" and torch.backends.cudnn.benchmark
    assert all(p.device.type == "cpu" and p.dtype == torch.float32 for p in model.parameters())
    assert fpr.device_fingerprint("torch", "cuda")["cudnn_benchmark"] is True


def test_export_on_the_torch_backend_in_bfloat16_runs_end_to_end(tmp_path):
    """Was exit 3: the timing moved the models to bfloat16 in place, then the accuracy evaluation fed
    them float32 images."""
    from conftest import TINY, cli, sets

    cheap = ["profile.backend=torch", "profile.dtype=bfloat16", "profile.channel_step=64", "profile.batch_size=1",
             "profile.min_runs=1", "profile.warmup=1", "export.batch_size=2", "export.min_runs=2",
             "export.max_seconds=1"]
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        code, _, err = cli("run", "--out", tmp_path / "run", *sets(TINY + cheap), "--quiet")
    finally:
        torch.set_num_threads(threads)
    assert code in (0, 2), err[-3000:]  # 2: a gate (noisy CPU timing); never an internal error
    rep = json.loads((tmp_path / "run" / "export" / "report.json").read_text())
    assert rep["backend"] == "torch" and rep["accuracy"]["pruned_top1"] is not None


# ---------------------------------------------------------------- D5: onnxruntime's silent fallback


class _FakeSession:
    runs_on = ["CPUExecutionProvider"]

    def __init__(self, model, sess_options=None, providers=None):
        self.asked = providers

    def get_providers(self):
        return list(self.runs_on)


@pytest.fixture
def fake_cuda_ort(monkeypatch):
    ort = timing.ensure_onnxruntime()
    monkeypatch.setattr(ort, "get_available_providers", lambda: ["CUDAExecutionProvider", "CPUExecutionProvider"])
    monkeypatch.setattr(ort, "InferenceSession", _FakeSession)
    return _FakeSession


def test_ort_session_refuses_a_silent_fallback_to_the_cpu(fake_cuda_ort, monkeypatch):
    with pytest.raises(SmcpError) as e:
        timing.ort_session(b"onnx", providers=timing.ort_providers("cuda:1"))
    msg = str(e.value)
    assert "\n" not in msg and "CUDAExecutionProvider" in msg and "runs on CPUExecutionProvider" in msg
    monkeypatch.setattr(fake_cuda_ort, "runs_on", ["CUDAExecutionProvider", "CPUExecutionProvider"])
    assert timing.ort_session(b"onnx", providers=timing.ort_providers("cuda")).get_providers()[0] == (
        "CUDAExecutionProvider")
    assert timing.ort_session(b"onnx").asked == ["CPUExecutionProvider"]  # CPU only: nothing to lose


@pytest.mark.gpu
def test_ort_session_on_cuda_runs_on_cuda(tmp_path):
    _needs_cuda()
    ort = timing.ensure_onnxruntime()
    if "CUDAExecutionProvider" not in ort.get_available_providers():
        pytest.skip("onnxruntime without CUDAExecutionProvider")
    from smcp_core.graph.signature import LayerSig
    from smcp_core.profile.measure import single_layer_onnx

    onnx = single_layer_onnx(LayerSig("conv", 8, 8, kernel=(3, 3), padding=(1, 1), in_hw=(8, 8)), 8, 8)
    sess = timing.ort_session(onnx, providers=timing.ort_providers("cuda"))
    assert sess.get_providers()[0] == "CUDAExecutionProvider"


# ---------------------------------------------------------------- D6, D7: what a report records


def test_cuda_fingerprint_and_report_record_cudnn_and_tf32_settings():
    fp = fpr.device_fingerprint("torch", "cuda")
    for key in ("cudnn_version", "cudnn_benchmark", "cudnn_allow_tf32", "matmul_allow_tf32", "driver_version"):
        assert key in fp, key
    assert fp["cudnn_allow_tf32"] == torch.backends.cudnn.allow_tf32
    rep = fpr.environment_report(backend="torch", device="cuda", batch_size=4, precision="bf16",
                                 layout="channels_last", input_shape=(4, 3, 32, 32))
    assert rep["fingerprint"]["cudnn_benchmark"] == torch.backends.cudnn.benchmark
    assert (rep["precision"], rep["layout"], rep["batch_size"]) == ("bfloat16", "channels_last", 4)


# ---------------------------------------------------------------- D10: CUDA fingerprint ids


def _cuda_fp(**over) -> dict:
    fp = {"backend": "torch", "device": "cuda", "device_type": "cuda", "cpu_model": "AMD EPYC 9654",
          "cpu_count": 192, "cpus_available": 192, "machine": "x86_64", "system": "Linux", "python": "3.11.7",
          "torch_version": "2.5.1", "threads": None, "backend_version": "2.5.1", "cuda_version": "12.4",
          "cudnn_version": 90100, "cudnn_benchmark": True, "cudnn_allow_tf32": True, "matmul_allow_tf32": False,
          "driver_version": "550.54.15", "gpu_name": "NVIDIA H200", "gpu_capability": "9.0",
          "gpu_memory_gb": 139.8, "gpu_count_visible": 8}
    return {**fp, **over}


def test_cuda_fingerprint_id_ignores_the_hosts_cpus_and_the_visible_gpus():
    fid = fpr.fingerprint_id(_cuda_fp())
    # CUDA_VISIBLE_DEVICES=1, a SLURM CPU mask, another host CPU, another device index: the same GPU
    for same in ({"gpu_count_visible": 1}, {"cpus_available": 16}, {"cpu_model": "Intel Xeon", "cpu_count": 64},
                 {"device": "cuda:1"}, {"threads": 4}, {"cudnn_benchmark": False}, {"python": "3.12.1"}):
        assert fpr.fingerprint_id(_cuda_fp(**same)) == fid, same
    for other in ({"gpu_name": "NVIDIA H100"}, {"gpu_capability": "8.0"}, {"cuda_version": "12.6"},
                  {"cudnn_version": 90300}, {"driver_version": "560.28.03"}, {"backend_version": "2.6.0"},
                  {"cudnn_allow_tf32": False}, {"matmul_allow_tf32": True}):
        assert fpr.fingerprint_id(_cuda_fp(**other)) != fid, other


def test_cpu_fingerprint_id_is_unchanged():
    fp = {"backend": "torch", "device": "cpu", "device_type": "cpu", "cpu_model": "Intel Xeon", "cpu_count": 8,
          "cpus_available": 4, "machine": "x86_64", "system": "Linux", "python": "3.11", "torch_version": "2.5.0",
          "threads": 2, "backend_version": "2.5.0"}
    assert fpr.fingerprint_id(fp) == "9455e52408fd"  # the id tables measured before issue 15 carry
    assert fpr.fingerprint_id({**fp, "cpus_available": 2}) != "9455e52408fd"  # CPUs matter on a CPU


@pytest.mark.parametrize("line, version", [
    ("NVRM version: NVIDIA UNIX x86_64 Kernel Module  535.129.03  Thu Oct 19 18:56:32 UTC 2023", "535.129.03"),
    ("NVRM version: NVIDIA UNIX Open Kernel Module for x86_64  570.86.15  Release Build  "
     "(dvs-builder@U16-I3-B13-4-3)  Thu Jan 23 2025", "570.86.15"),
])
def test_driver_version_is_read_from_proc(tmp_path, monkeypatch, line, version):
    f = tmp_path / "version"
    f.write_text(line + "\nGCC version:  gcc version 12.2.0\n")
    assert fpr.nvidia_driver_version(str(f)) == version
    monkeypatch.setattr(fpr, "_PROC_DRIVER", str(f))
    assert fpr.device_fingerprint("torch", "cuda")["driver_version"] == version


# ---------------------------------------------------------------- D11a: one GPU per torchrun rank


def test_under_torchrun_each_rank_uses_its_local_gpu(monkeypatch):
    said: list[str] = []
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    monkeypatch.delenv("LOCAL_RANK", raising=False)
    assert dist.local_device("cuda:3", said.append) == torch.device("cuda:3")  # one process: as asked
    monkeypatch.setenv("WORLD_SIZE", "4")
    monkeypatch.setenv("LOCAL_RANK", "2")
    assert dist.local_device("cuda", said.append) == torch.device("cuda:2")
    assert dist.local_device("cuda:2", said.append) == torch.device("cuda:2") and not said
    assert dist.local_device("cuda:0", said.append) == torch.device("cuda:2")
    assert len(said) == 1 and "\n" not in said[0] and "LOCAL_RANK=2" in said[0]
    assert dist.local_device("cpu", said.append) == torch.device("cpu")


def test_init_from_env_sets_the_local_gpu(monkeypatch):
    calls = []
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("LOCAL_RANK", "1")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "set_device", lambda d: calls.append(("set_device", torch.device("cuda", d)
                                                                          if isinstance(d, int) else d)))
    monkeypatch.setattr(dist.dist, "is_initialized", lambda: False)
    monkeypatch.setattr(dist.dist, "init_process_group", lambda backend: calls.append(("init", backend)))
    assert dist.init_from_env("cuda:0")
    assert calls == [("set_device", torch.device("cuda:1")), ("init", "nccl")]


# ---------------------------------------------------------------- D11b: grid size against the step


def _resnet50_sigs():
    from smcp_core.graph.channel_graph import ChannelGraph
    from smcp_core.models import build_model

    model = build_model("torchvision/resnet50").eval()
    return [layer.sig for layer in ChannelGraph(model, torch.randn(1, 3, 224, 224)).layers]


def test_a_larger_channel_step_never_gives_resnet50_more_grid_points():
    from smcp_core.profile.measure import _group_signatures, _plan_entry

    sigs = _resnet50_sigs()
    per_layer = {step: sum(len(channel_grid(w, step)) for s in sigs for w in (s.cin, s.cout))
                 for step in range(1, 300)}
    assert all(per_layer[s + 1] <= per_layer[s] for s in range(1, 299))
    assert all(len(channel_grid(w, step)) <= MAX_GRID_POINTS for w in (3, 64, 2048) for step in range(1, 300))
    groups = _group_signatures(sigs)

    def points(step: int) -> int:
        entries = [_plan_entry(k, ss, step) for k, ss in groups.items()]
        return sum(len(e.cin_grid) * (1 if e.cout_grid is None else len(e.cout_grid)) for e in entries)

    table = [points(2 ** i) for i in range(0, 10)]  # steps 1 .. 512
    assert all(b <= a for a, b in zip(table, table[1:])), table
    assert table[6] < 3000 and table[7] < 1000 and table[8] < 300  # steps 64, 128, 256 (was 2,716, 9,318, 62,505)


def test_an_fp16_table_is_calibrated_against_fp16_whole_model_runs(tmp_path):
    # defect 6: on onnxruntime the table times float16 layers; the whole model (calibration, closed loop)
    # was exported and timed in float32 whatever profile.dtype said
    import onnx

    from smcp_core.config.recipe import ProfileConfig
    from smcp_core.stages.measure import Bench, measure_models

    model = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.ReLU(), torch.nn.Flatten(),
                                torch.nn.LazyLinear(4))
    model(torch.randn(1, 3, 8, 8))
    prof = ProfileConfig(backend="onnxruntime", device="cpu", dtype="float16", warmup=1)
    res = measure_models({"m": model}, Bench(prof, torch.randn(1, 3, 8, 8)), batch=2, backend="onnxruntime",
                         workdir=tmp_path, min_runs=2, max_seconds=10)
    elem = onnx.load(str(res["onnx"]["m"])).graph.input[0].type.tensor_type.elem_type
    assert elem == onnx.TensorProto.FLOAT16 and res["stats"]["m"]["n"] >= 1
    assert next(model.parameters()).dtype == torch.float32  # the caller's model is left alone
