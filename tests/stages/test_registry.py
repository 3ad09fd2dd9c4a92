"""The stage registry `smcp run` loops over, and the typed results' JSON forms."""

from __future__ import annotations

from smcp_core import stages
from smcp_core.stages.results import ExportResult, PruneResult


def test_pipeline_runs_every_stage_with_outputs_in_order():
    assert tuple(s.name for s in stages.PIPELINE) == stages.STAGES == tuple(stages.STAGE_OUTPUTS)
    assert {s.name: s.options for s in stages.PIPELINE}["export"] == ("trt",)


def _prune_result(**extra) -> PruneResult:
    return PruneResult(stamp="s", target={"kind": "speedup", "value": 2}, budget=1.0, cost_unit="ms", full_cost=2.0,
                       final_cost=1.0, meets_budget=True, predicted_ms=1.0, predicted_speedup=2.0, flops_ratio=0.5,
                       params_ratio=0.6, top1=None, seconds=3.0, groups=[], layers=[{"name": "conv"}],
                       history=[{"event": "epoch"}], world_size=1, **extra)


def test_prune_summary_leaves_out_the_in_memory_result_and_an_absent_unstructured_section():
    d = _prune_result(train=object()).to_dict()
    assert "train" not in d and "unstructured" not in d and d["history"] == [{"event": "epoch"}]
    assert "unstructured" in _prune_result(unstructured={"sparsity": 0.5}).to_dict()
    brief = _prune_result().brief()
    assert "history" not in brief and "layers" not in brief and brief["predicted_speedup"] == 2.0


def test_export_report_round_trips_through_its_json_form():
    rep = ExportResult(stamp="s", backend="onnxruntime", device="cpu", batch_size=1, dtype="float32",
                       input_shape=[1, 3, 8, 8], baseline={"latency_ms": 2.0}, pruned={"latency_ms": 1.0}, speedup=2.0,
                       gate={"speedup_interval": [1.9, 2.1]}, target={"kind": "speedup", "value": 1.5},
                       target_speedup=1.5, passed=True,
                       parity={"passed": True}, flops_ratio=0.5, params_ratio=0.5, accuracy=None, environment={},
                       files={})
    assert ExportResult.from_dict({**rep.to_dict(), "extra": 1}) == rep
