"""measure_against_baseline / measure_as_export: every model timed in pairs with the baseline, as
the export gate times a pruned model (fake runners with known durations: no real timing)."""

from __future__ import annotations

import pytest
import torch

from smcp_core.config.recipe import load_recipe
from smcp_core.stages import measure


def _fake_runners(durations: dict[str, float], calls: list):
    """``_runners`` whose forward calls return their (fixed) duration, with a timer that reports it."""

    def runners(models, where, *, batch, backend, workdir, onnx_paths=None, trt=None):
        calls.append({"names": list(models), "batch": batch, "backend": backend, "workdir": workdir})
        fns = {name: (lambda d=durations[name]: d) for name in models}
        return fns, (lambda fn: fn()), {}

    return runners


def test_each_model_is_paired_with_the_baseline(monkeypatch, tmp_path):
    calls: list = []
    monkeypatch.setattr(measure, "_runners", _fake_runners({"dense": 2e-3, "half": 1e-3, "quarter": 5e-4}, calls))
    paired = []
    real = measure.time_paired

    def spy(fa, fb, **kw):
        paired.append((fa(), fb()))
        return real(fa, fb, **kw)

    monkeypatch.setattr(measure, "time_paired", spy)
    recipe = load_recipe("quickstart", [])
    models = {"dense": torch.nn.Identity(), "half": torch.nn.Identity(), "quarter": torch.nn.Identity()}
    res = measure.measure_against_baseline(models, recipe, workdir=tmp_path / "w", baseline="dense",
                                           min_rounds=5, min_seconds=0.06, max_seconds=30)
    assert paired == [(2e-3, 1e-3), (2e-3, 5e-4)]  # the baseline is the first of every pair
    assert res["speedup"]["half"].median == pytest.approx(2.0)
    assert res["speedup"]["quarter"].median == pytest.approx(4.0)
    assert res["ms"]["dense"] == pytest.approx(2.0) and res["ms"]["quarter"] == pytest.approx(0.5)
    # min_seconds of timed calls per pair, beyond min_rounds: 0.06 s at 3 ms / 2.5 ms per round
    assert res["stats"]["half"]["n"] >= 20 and res["stats"]["quarter"]["n"] >= 24
    assert res["stats"]["dense"]["n"] == res["stats"]["half"]["n"] + res["stats"]["quarter"]["n"]
    assert calls[0]["batch"] == recipe.profile.batch_size and calls[0]["backend"] == recipe.profile.backend
    assert not (tmp_path / "w").exists(), "the scratch folder of the ONNX files is removed"


def test_measure_as_export_uses_the_export_settings(monkeypatch, tmp_path):
    calls: list = []
    monkeypatch.setattr(measure, "_runners", _fake_runners({"dense": 3e-3, "slim": 1e-3}, calls))
    recipe = load_recipe("quickstart", ["export.batch_size=4", "export.min_runs=7", "export.max_seconds=4"])
    st = measure.measure_as_export({"dense": torch.nn.Identity(), "slim": torch.nn.Identity()}, recipe, tmp_path)
    assert calls[0]["batch"] == 4 and calls[0]["backend"] == recipe.export_backend()
    assert st["slim"]["speedup"] == pytest.approx(3.0) and st["slim"]["speedup_interval"] == pytest.approx([3.0, 3.0])
    assert st["slim"]["rounds"] >= 7 and st["dense"]["speedup"] == 1.0
    assert st["slim"]["median_ms"] == pytest.approx(1.0) and st["dense"]["median_ms"] == pytest.approx(3.0)
    assert not list(tmp_path.glob(".measure_*"))
