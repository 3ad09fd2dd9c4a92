"""`smcp report` and prune/metrics.csv, on a synthetic run directory (no training needed).

The same command on a real (tiny) run is exercised in test_reliability.py."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
from conftest import cli

from smcp_core.prune.metrics import (
    METRICS_COLUMNS,
    metrics_csv_text,
    metrics_rows,
    read_metrics_csv,
    write_metrics_csv,
)
from smcp_core.utils.fsutil import atomic_write_json

pytest.importorskip("matplotlib")




def one_error_line(err: str) -> str:
    assert "Traceback" not in err
    lines = [l for l in err.splitlines() if l.strip()]
    assert len(lines) == 1, err
    assert lines[0].startswith("error: ")
    return lines[0]


# --------------------------------------------------------------------------------------------------
# a synthetic run: 6 epochs (2 warm-up, 2 ramp with 3 mask updates, 2 cooldown) of a 4-layer model

SCALE = 0.9


def history() -> list[dict]:
    h = []
    full, cost = 10.0, 10.0
    for e in range(6):
        if e in (2, 3):
            budgets = [8.0, 7.0] if e == 2 else [6.0]
            for b in budgets:
                cost = b - 0.1
                h.append({"event": "mask_update", "epoch": e, "progress": 0.5, "budget": b, "cost": cost,
                          "predicted": SCALE * cost, "kept_classes": 40, "solve_ms": 1.0})
        budget = full if e < 2 else h[-1]["budget"]
        h.append({"event": "epoch", "epoch": e + 1, "loss": 2.0 / (e + 1), "lr": 0.1 * (1 - e / 6), "seconds": 1.5,
                  "cost": cost, "predicted": SCALE * cost, "top1": 50.0 + 5 * e, "train_top1": 48.0 + 5 * e,
                  "budget": budget, "budget_predicted": SCALE * budget, "kept_classes": 64 if e < 2 else 40,
                  "total_classes": 64})
    return h


LAYERS = [("conv1", 3, 16, 3, 16), ("layer1.conv1", 16, 8, 16, 16), ("layer1.conv2", 8, 16, 16, 16),
          ("fc", 16, 10, 16, 10)]


def make_run(root: Path, *, with_export: bool = True, with_metrics: bool = True) -> Path:
    run = root / "run"
    (run / "prune").mkdir(parents=True)
    (run / "recipe.resolved.yaml").write_text(
        "name: synthetic\nmodel:\n  source: cifar/resnet20\nprune:\n  warmup_epochs: 2\n  ramp_epochs: 2\n"
        "  cooldown_epochs: 2\n")
    atomic_write_json(run / "latency.json", {
        "format": "smcp-latency-table", "schema_version": 1,
        "meta": {"backend": "onnxruntime", "device": "cpu", "batch_size": 8},
        "model": {"measured_ms": 9.0, "layer_sum_ms": 10.0,
                  "calibration": {"scale": SCALE, "offset_ms": 0.0, "points": [
            {"name": "baseline", "layer_sum_ms": 10.0, "measured_ms": 9.0, "predicted_ms": 9.0},
            {"name": "uniform75", "layer_sum_ms": 7.5, "measured_ms": 7.0, "predicted_ms": 6.75},
            {"name": "uniform50", "layer_sum_ms": 5.0, "measured_ms": 4.8, "predicted_ms": 4.5}]}},
        "entries": {}}, checksum=True)
    h = history()
    atomic_write_json(run / "prune" / "summary.json", {
        "stamp": "x", "target": {"kind": "speedup", "value": 1.5, "baseline_ms": 9.0, "target_ms": 6.0,
                                 "aim_ms": 5.7, "margin": 0.05, "unit": "ms"},
        "budget": 6.0, "cost_unit": "ms", "full_cost": 10.0, "final_cost": 5.9, "meets_budget": True,
        "predicted_ms": SCALE * 5.9, "predicted_speedup": 9.0 / (SCALE * 5.9), "flops_ratio": 0.55,
        "params_ratio": 0.6, "top1": 75.0, "seconds": 9.0,
        "groups": [{"group": 0, "kept": 3, "channels": 3, "consumers": ["conv1"]},
                   {"group": 1, "kept": 8, "channels": 16, "consumers": ["layer1.conv1", "fc"]}],
        "layers": [{"name": n, "kind": "conv", "cin": ci, "cout": co, "cin_full": cif, "cout_full": cof}
                   for n, ci, co, cif, cof in LAYERS],
        "history": h}, checksum=True)
    if with_metrics:
        write_metrics_csv(run / "prune" / "metrics.csv", h, unit="ms")
    if with_export:
        atomic_write_json(run / "slim" / "slim.json", {"stamp": "y", "max_abs_diff": 1e-7, "tolerance": 1e-4,
                                                       "params": 600, "params_full": 1000, "flops": 55,
                                                       "flops_full": 100,
                                                       "seconds": 0.1}, checksum=True)
        stats = {"median_ms": 0, "p10_ms": 0, "p90_ms": 0, "min_ms": 0, "n": 50, "stable": True}
        atomic_write_json(run / "export" / "report.json", {
            "stamp": "z", "backend": "onnxruntime", "device": "cpu", "batch_size": 8,
            "baseline": {"latency_ms": 9.2, "stats": {**stats, "median_ms": 9.2, "p10_ms": 9.0, "p90_ms": 9.6}},
            "pruned": {"latency_ms": 5.6, "predicted_ms": SCALE * 5.9,
                       "stats": {**stats, "median_ms": 5.6, "p10_ms": 5.4, "p90_ms": 6.0}},
            "speedup": 9.2 / 5.6, "target": {"kind": "speedup", "value": 1.5}, "target_speedup": 1.5, "passed": True,
            "parity": {"max_abs_diff": 1e-6, "tolerance": 1e-4, "passed": True}, "flops_ratio": 0.55,
            "params_ratio": 0.6, "accuracy": {"pruned_top1": 75.0, "baseline_top1": 78.0, "images": 100,
                                              "baseline_from": "checkpoint"},
            "environment": {"backend": "onnxruntime", "device": "cpu", "batch_size": 8,
                            "libraries": {"smcp": "0.1.0"}, "fingerprint": {"cpu_model": "test cpu"}}}, checksum=True)
    return run


# --------------------------------------------------------------------------------------------------
# metrics.csv


def test_metrics_rows_one_per_epoch_with_budget_and_updates():
    rows = metrics_rows(history(), unit="ms")
    assert [r["epoch"] for r in rows] == [1, 2, 3, 4, 5, 6]
    assert [r["mask_updates"] for r in rows] == [0, 0, 2, 1, 0, 0]
    assert [r["budget"] for r in rows] == [10.0, 10.0, 7.0, 6.0, 6.0, 6.0]
    assert rows[2]["budget_predicted"] == pytest.approx(SCALE * 7.0)
    assert rows[0]["val_top1"] == 50.0 and rows[0]["train_top1"] == 48.0
    assert rows[-1]["kept_channels"] == 40 and rows[-1]["total_channels"] == 64
    assert all(r["unit"] == "ms" for r in rows)


def test_metrics_rows_from_an_older_history_derive_the_budget():
    new_keys = ("budget", "budget_predicted", "train_top1", "kept_classes", "total_classes")
    old = [{k: v for k, v in r.items() if r["event"] != "epoch" or k not in new_keys} for r in history()]
    rows = metrics_rows(old)
    assert [r["budget"] for r in rows] == [10.0, 10.0, 7.0, 6.0, 6.0, 6.0]
    assert rows[3]["budget_predicted"] == pytest.approx(SCALE * 6.0)
    assert rows[0]["train_top1"] is None and rows[0]["kept_channels"] is None


def test_metrics_csv_round_trip(tmp_path):
    p = write_metrics_csv(tmp_path / "metrics.csv", history(), unit="ms")
    text = p.read_text()
    assert text.splitlines()[0] == ",".join(METRICS_COLUMNS)
    assert len(text.splitlines()) == 7
    back = read_metrics_csv(p)
    want = metrics_rows(history(), unit="ms")
    assert len(back) == len(want)
    for a, b in zip(back, want):
        for k in METRICS_COLUMNS:
            assert a[k] == (pytest.approx(b[k]) if isinstance(b[k], float) else b[k]), k
    # rewriting from the same (checkpointed) history gives the same bytes: resume never duplicates rows
    write_metrics_csv(p, history(), unit="ms")
    assert p.read_text() == text
    assert metrics_csv_text([]) == ",".join(METRICS_COLUMNS) + "\n"


def test_metrics_csv_corruption_is_detected(tmp_path):
    p = write_metrics_csv(tmp_path / "metrics.csv", history(), unit="ms")
    data = p.read_bytes()
    p.write_bytes(data[: len(data) // 2])
    from smcp_core.errors import SmcpError

    with pytest.raises(SmcpError, match="corrupt"):
        read_metrics_csv(p)


# --------------------------------------------------------------------------------------------------
# smcp report


def _png(path: Path) -> None:
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 5000, path


def test_report_writes_plots_markdown_and_html(tmp_path):
    run = make_run(tmp_path)
    code, out, err = cli("report", run, "--json")
    assert code == 0, err
    doc = json.loads(out)
    assert doc["ok"] is True and doc["skipped"] == [] and doc["epochs"] == 6
    rdir = run / "report"
    for name in ("channels.png", "training.png", "latency.png"):
        _png(rdir / name)
    md = (rdir / "report.md").read_text()
    for needle in ("# smcp report — synthetic", "**PASS**", "![kept channels per layer](channels.png)",
                   "![budget, predicted cost and accuracy over training](training.png)",
                   "![predicted vs measured latency](latency.png)", "| uniform75 | profile | 6.750 | 7.000 |",
                   "| pruned | export |", "`prune/metrics.csv`", "| 0 | 3/3 | conv1 |",
                   "| 1 | 8/16 | layer1.conv1, fc |"):
        assert needle in md, needle
    assert len(doc["latency_points"]) == 5  # 3 calibration models + baseline and pruned at export
    html = (rdir / "report.html").read_text()
    assert html.count("data:image/png;base64,") == 3 and "<table>" in html
    assert doc["artifacts_checked"] == 5


def test_report_on_a_partial_run_skips_what_is_missing(tmp_path):
    run = make_run(tmp_path, with_export=False, with_metrics=False)
    code, out, err = cli("report", run, "--out", tmp_path / "rep", "--no-html", "--json", "--quiet")
    assert code == 0, err
    doc = json.loads(out)
    assert not (tmp_path / "rep" / "report.html").exists()
    assert "Pruned (not exported yet)" in (tmp_path / "rep" / "report.md").read_text()
    # metrics come from the summary's history; latency points from the profile only
    assert doc["epochs"] == 6 and len(doc["latency_points"]) == 3
    assert "prune/summary.json (history)" in (tmp_path / "rep" / "report.md").read_text()


def test_report_of_a_missing_or_empty_directory_is_one_error_line(tmp_path):
    code, out, err = cli("report", tmp_path / "nope")
    assert code == 1 and "does not exist" in one_error_line(err)
    (tmp_path / "empty").mkdir()
    code, out, err = cli("report", tmp_path / "empty", "--json")
    assert code == 1 and "no smcp artifacts" in one_error_line(err)
    assert json.loads(out)["ok"] is False


def test_report_refuses_a_corrupt_artifact_and_leaves_it(tmp_path):
    run = make_run(tmp_path)
    f = run / "export" / "report.json"
    data = f.read_bytes().replace(b'"passed": true', b'"passed": false', 1)  # still valid JSON
    f.write_bytes(data)
    code, out, err = cli("report", run)
    assert code == 1
    line = one_error_line(err)
    assert "report.json" in line and "SHA256SUMS" in line
    assert f.read_bytes() == data
    assert not (run / "report" / "report.md").exists()


def test_report_without_matplotlib_says_how_to_install(tmp_path, monkeypatch):
    run = make_run(tmp_path)
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib -> ImportError
    code, out, err = cli("report", run)
    assert code == 1
    assert "install smcp[report]" in one_error_line(err)
    assert not (run / "report").exists()
