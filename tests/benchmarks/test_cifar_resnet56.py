"""benchmarks/cifar_resnet56.py without training: a compare in which every method failed becomes
error rows (the benchmark goes on), and the markdown table keeps its columns for every kind of row."""

from __future__ import annotations

import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "benchmarks"))
import cifar_resnet56 as bench  # noqa: E402
import pytest  # noqa: E402

from smcp_core.errors import SmcpError  # noqa: E402


class _Quiet:
    def log(self, msg: str) -> None:
        pass


def _run(tmp_path) -> bench.BenchRun:
    return bench.BenchRun("cifar10_resnet56_2x", tmp_path, [], {}, _Quiet(), False, {"smcp": ["prune.epochs=3"]})


def test_a_failed_compare_gives_error_rows_and_the_nodistill_name(tmp_path, monkeypatch):
    seen = {}

    def failing(overrides, methods, cdir, sets, rep, method_overrides, **kw):
        seen.update(overrides=overrides, method_overrides=method_overrides, kw=kw)
        raise SmcpError("every method failed; smcp: boom")

    monkeypatch.setattr(bench, "compare_rows", failing)
    rows = bench._nodistill_rows(_run(tmp_path), 2.0)
    assert rows == [{"target": 2.0, "method": bench.NO_DISTILL, "dir": str(tmp_path / "2x_nodistill" / "smcp"),
                     "error": "every method failed; smcp: boom"}]
    assert seen["overrides"] == ["prune.distill.enabled=false", "prune.target.speedup=2.0"]
    assert seen["method_overrides"] == {"smcp": ["prune.epochs=3"]} and seen["kw"]["keep_model"]


def test_markdown_keeps_eleven_columns_for_every_row():
    top1 = {"jpeg_test": 88.0, "exact_test": 91.0}
    ok = {"target": 2.0, "method": "smcp", "speedup": 2.1, "loop_speedup": 2.2, "loop_ms": 1.2, "flops_ratio": 0.4,
          "paired_speedup": 2.31, "paired_interval": [2.28, 2.35],
          "params_ratio": 0.7, "top1": top1, "drop_vs_none": {"jpeg_test": 1.0, "exact_test": 0.5}}
    res = {"pretrained_top1": top1, "recipe": "r", "overrides": [], "backend": "onnxruntime", "batch_size": 1,
           "loop": {"dense_ms": 2.6}, "eval_images": {"jpeg_test": 10000, "exact_test": 1017},
           "none": {"target": 2.0, "method": "none", "error": "boom"},
           "rows": [ok, {"target": 3.0, "method": "smcp", "error": "failed too"}],
           "references": [{"method": "resnet20 (dense, pretrained)", "loop_speedup": 2.9, "loop_ms": 0.9,
                           "top1": top1}]}
    table = [line for line in bench.markdown(res).splitlines() if line.startswith("|")]
    assert len(table) == 2 + 1 + 2 + 1  # header, rule, none, two rows, one reference
    assert all(line.count("|") == 12 for line in table), table
    assert "failed: boom" in table[2] and "**2.20x**" in table[3] and "failed: failed too" in table[4]
    assert "2.31x [2.28-2.35]" in table[3] and "| n/a |" in table[5]  # a reference row written without pairs


def test_methods_at_gives_one_target_its_own_methods(tmp_path, monkeypatch):
    calls = []

    def fake_compare(b, t, cdir, overrides, methods, names=None):
        calls.append((t, methods))
        return []

    monkeypatch.setattr(bench, "_compare_rows", fake_compare)
    monkeypatch.setattr(bench, "eval_sets", lambda overrides, recipe: {})
    monkeypatch.setattr(bench, "top1s", lambda model, sets: {})
    monkeypatch.setattr(bench.stages, "build_model", lambda recipe: None)
    monkeypatch.setattr(bench, "_reference_models", lambda *a: (_ for _ in ()).throw(SmcpError("stop")))
    at = bench._methods_at(["1.5=smcp"], [2.0, 1.5])
    with pytest.raises(SmcpError, match="stop"):
        bench.run([2.0, 1.5], tmp_path, [], ["smcp", "halp", "none"], methods_at=at)
    assert calls == [(2.0, ["smcp", "halp", "none"]), (1.5, ["smcp"])]


def test_methods_at_rejects_what_it_cannot_run():
    with pytest.raises(SmcpError, match="one of --targets"):
        bench._methods_at(["3=smcp"], [2.0, 1.5])
    with pytest.raises(SmcpError, match=r"^--methods-at '2=smpc': unknown method 'smpc'"):
        bench._methods_at(["2=smpc"], [2.0])
    with pytest.raises(SmcpError, match="given twice"):
        bench._methods_at(["2=smcp", "2=halp"], [2.0])
    with pytest.raises(SmcpError, match="runs once, at the first target"):
        bench._methods_at(["1.5=smcp,none"], [2.0, 1.5])
    assert bench._methods_at(["2=halp,none"], [2.0, 1.5]) == {2.0: ["halp", "none"]}


def test_bad_arguments_are_one_line_not_a_traceback(monkeypatch, capsys):
    monkeypatch.setattr(bench, "run", lambda *a, **kw: pytest.fail("bad arguments must stop before any run"))
    for argv in (["--targets", "2,x"], ["--targets", "2", "--methods-at", "3=smcp"],
                 ["--methods", "smcp", "--set-for", "halp:prune.epochs=1"]):
        monkeypatch.setattr(sys, "argv", ["cifar_resnet56.py", *argv])
        with pytest.raises(SystemExit) as exc:
            bench.main()
        assert str(exc.value.code).startswith("cifar_resnet56.py: --"), exc.value.code
        assert "\n" not in str(exc.value.code)


def test_set_for_may_name_a_method_of_methods_at_only(monkeypatch):
    seen = {}
    monkeypatch.setattr(bench, "run", lambda *a, **kw: seen.update(kw) or (_ for _ in ()).throw(SmcpError("stop")))
    monkeypatch.setattr(sys, "argv", ["cifar_resnet56.py", "--targets", "2,1.5", "--methods", "smcp",
                                      "--methods-at", "1.5=halp", "--set-for", "halp:prune.epochs=1"])
    with pytest.raises(SystemExit, match="stop"):
        bench.main()
    assert seen["method_overrides"] == {"halp": ["prune.epochs=1"]} and seen["methods_at"] == {1.5: ["halp"]}


def _peers_dir(tmp_path, smoke: bool):
    import json

    import torch

    tdir = tmp_path / "peers" / "2x"
    tdir.mkdir(parents=True)
    torch.save(torch.nn.Linear(2, 2), tdir / "model.pt")
    (tdir / "row.json").write_text(json.dumps({"key": {"smoke": smoke}, "status": "met"}))
    return tmp_path / "peers"


def test_peers_models_are_rows_and_smoke_models_are_not(tmp_path, monkeypatch):
    monkeypatch.setattr(bench, "load_recipe", lambda name, overrides: None)
    monkeypatch.setattr(bench.stages, "build_model", lambda recipe: __import__("torch").nn.Identity())
    base = type("Base", (), {"model": type("M", (), {"checkpoint": str(tmp_path / "resnet56.th")})()})()
    models = bench._reference_models(_run(tmp_path), base, _peers_dir(tmp_path, smoke=False))
    assert list(models) == ["resnet20 (dense, pretrained)", "torch-pruning 2x (met)"]
    assert not models["torch-pruning 2x (met)"].training
    with pytest.raises(SmcpError, match="no peers.py model"):
        bench._reference_models(_run(tmp_path), base, _peers_dir(tmp_path / "s", smoke=True))
