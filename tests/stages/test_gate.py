"""The export gate on a real run directory: the report carries the paired measurement and its verdict,
and ``export.target`` gates the same pruned model against another target without pruning again."""

from __future__ import annotations

import json
import shutil

from conftest import TINY_RUN, cli, sets


def _report(run) -> dict:
    return json.loads((run / "export" / "report.json").read_text())


def test_the_report_records_the_paired_measurement_and_its_verdict(tiny_run):
    r = _report(tiny_run)
    g = r["gate"]
    lo, hi = g["speedup_interval"]
    assert g["rounds"] >= 1 and g["stopped"] in ("decided", "max_rounds", "max_seconds")
    assert lo <= r["speedup"] == g["speedup"] <= hi
    v = g["verdict"]
    assert v["target"] == r["target"]["value"] and v["passed"] == r["passed"]
    assert v["decided_by"] in ("interval", "median") and v["reason"]
    # the latencies shown beside it come from the same rounds
    assert r["baseline"]["stats"]["n"] == r["pruned"]["stats"]["n"] == g["rounds"]


def test_export_target_regates_the_same_model_and_a_target_far_beyond_it_fails(tiny_run, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(tiny_run, run)
    slim_bytes = (run / "slim" / "weights.pt").read_bytes()
    code, out, err = cli("export", "--out", run, *sets(TINY_RUN + ["export.target.speedup=50"]), "--json")
    assert code == 2, err[-2000:]
    doc = json.loads(out)
    assert doc["ok"] is False and doc["exit_code"] == 2 and "interval" in doc["error"]
    r = _report(run)
    assert r["target"] == {"kind": "speedup", "value": 50.0} and not r["passed"]
    assert r["gate"]["verdict"]["decided_by"] == "interval" and r["gate"]["speedup_interval"][1] < 50
    assert (run / "slim" / "weights.pt").read_bytes() == slim_bytes  # nothing upstream re-ran


def test_a_latency_target_is_judged_on_the_pruned_models_latency(tiny_run, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(tiny_run, run)
    code, _, err = cli("export", "--out", run, *sets(TINY_RUN + ["export.target.latency_ms=1e-6"]), "--quiet")
    assert code == 2 and "ms" in err
    v = _report(run)["gate"]["verdict"]
    assert v["at_least"] is False and v["lo"] > 1e-6 and not v["passed"]


def test_a_failed_engine_parity_is_named_by_the_gate(tiny_run):
    import pytest

    from smcp_core.errors import GateFailed
    from smcp_core.stages import ExportResult, gate

    doc = _report(tiny_run)
    doc.update(passed=False, tensorrt={"precision": "fp16", "parity": {
        "passed": False, "max_rel_diff": 0.2, "tolerance": 0.01}})
    with pytest.raises(GateFailed, match=r"TensorRT engine parity failed: 0\.2 relative .* > 0\.01 \(fp16\)"):
        gate(ExportResult.from_dict(doc))
    assert "tensorrt" not in ExportResult.from_dict(_report(tiny_run)).to_dict()  # other backends: no key


def test_trt_flag_enters_the_recipe_so_a_run_exported_without_engines_is_not_up_to_date():
    from smcp_cli.common import load
    from smcp_core.stages.artifacts import stamp

    plain, trt = load("quickstart", TINY_RUN), load("quickstart", TINY_RUN, trt=True)
    assert trt.export.formats == [*plain.export.formats, "trt"]
    assert stamp(plain, "export") != stamp(trt, "export") and stamp(plain, "slim") == stamp(trt, "slim")
    assert load("quickstart", [*TINY_RUN, "export.formats=[onnx, trt]"], trt=True).export.formats == ["onnx", "trt"]


def test_each_model_is_timed_through_several_onnxruntime_sessions_in_turn(tmp_path, monkeypatch):
    """One session's lasting offset must not decide a speed-up: on onnxruntime CPU the paired
    measurement times every model through ORT_CPU_SESSIONS sessions of it, called in turn."""
    import torch

    from smcp_core.config.recipe import ProfileConfig
    from smcp_core.stages import measure

    runs: dict[int, int] = {}
    real_session = measure.ort_session

    def counted_session(*args, **kwargs):
        sess = real_session(*args, **kwargs)
        real_run, key = sess.run, len(runs)
        runs[key] = 0

        def run(*a, **k):
            runs[key] += 1
            return real_run(*a, **k)

        sess.run = run
        return sess

    monkeypatch.setattr(measure, "ort_session", counted_session)
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.ReLU(), torch.nn.Flatten(), torch.nn.Linear(288, 4))
    bench = measure.Bench(ProfileConfig(backend="onnxruntime", device="cpu", warmup=0), torch.randn(1, 3, 8, 8))
    m = measure.measure_pair(model, model, bench, batch=1, backend="onnxruntime", workdir=tmp_path, kind=None,
                             target=None, min_rounds=12, max_seconds=30)
    assert len(m.timing.a_s) == 12
    assert len(runs) == 2 * measure.ORT_CPU_SESSIONS > 2
    # every session ran (once on creation, then its turns of the warm-up and the 12 rounds)
    assert all(n >= 1 + 12 // measure.ORT_CPU_SESSIONS for n in runs.values()), runs
