"""The per-resolution calibration (``profile.calibration: per_resolution``): its fit, the removal
variants that separate the resolutions, and the layer weights the cost model applies."""

from __future__ import annotations

import pytest
import torch
from chain_support import fake_table

from smcp_core.config.recipe import load_recipe
from smcp_core.errors import SmcpError
from smcp_core.graph.channel_graph import ChannelGraph
from smcp_core.models import build_model
from smcp_core.profile.calibration import MIN_WEIGHT, fit_resolution_calibration
from smcp_core.profile.cost_model import CostModel, layer_site
from smcp_core.stages.measure import calibration_keeps
from smcp_core.stages.profiling import fit_whole_model

TRUE = {"32x32": 0.8, "16x16": 0.9, "8x8": 0.6}  # per-resolution scales, ms per table ms
REMOVED = 0.004  # ms per removed layer


@pytest.fixture(scope="module")
def r20():
    return ChannelGraph(build_model("cifar/resnet20"), torch.randn(1, 3, 32, 32))


def _measured(by_site: dict[str, float], removed: int) -> float:
    return sum(TRUE.get(s, 0.9) * v for s, v in by_site.items()) + REMOVED * removed


def test_fit_recovers_known_resolution_scales():
    dense = {"32x32": 1.0, "16x16": 1.2, "8x8": 1.1, "1x1": 0.01}  # the linear layer: < 5 %, merged
    pts = [(dense, 0), ({"32x32": 0.9, "16x16": 0.6, "8x8": 0.8, "1x1": 0.01}, 0),
           ({"32x32": 0.9, "16x16": 0.5, "8x8": 0.5, "1x1": 0.01}, 0),
           ({"32x32": 0.5, "16x16": 1.2, "8x8": 1.1, "1x1": 0.01}, 6),
           ({"32x32": 1.0, "16x16": 0.6, "8x8": 1.1, "1x1": 0.01}, 6),
           ({"32x32": 1.0, "16x16": 1.2, "8x8": 0.55, "1x1": 0.01}, 6)]
    points = [(s, n, _measured({k: v for k, v in s.items() if k != "1x1"}, n) + 0.9 * s["1x1"]) for s, n in pts]
    scale, removed_ms, w = fit_resolution_calibration(points, dense)
    # the merged linear site shares the weight of the largest site (16x16)
    assert w["1x1"] == pytest.approx(w["16x16"])
    for site, a in TRUE.items():
        assert scale * w[site] == pytest.approx(a, rel=1e-6), site
    assert scale * removed_ms == pytest.approx(REMOVED, rel=1e-6)
    assert scale == pytest.approx(sum(TRUE.get(s, 0.9) * v for s, v in dense.items()) / sum(dense.values()))


def test_fit_refuses_what_the_points_cannot_support():
    dense = {"32x32": 1.0, "8x8": 1.0}
    # fewer points than coefficients: not separable
    assert fit_resolution_calibration([(dense, 0, 1.5), ({"32x32": 0.5, "8x8": 1.0}, 0, 1.2)], dense) is None
    # a resolution that would look almost free to the allocator (weight below MIN_WEIGHT): refused
    pts = [(dense, 0, 1.05), ({"32x32": 0.5, "8x8": 1.0}, 0, 0.55), ({"32x32": 1.0, "8x8": 0.5}, 0, 1.025),
           ({"32x32": 0.5, "8x8": 0.5}, 0, 0.525)]
    assert fit_resolution_calibration(pts, dense) is None and MIN_WEIGHT > 0.05 / 1.0


def test_per_resolution_variants_remove_blocks_of_one_resolution_each(r20):
    plain = calibration_keeps(r20, 4)
    keeps = calibration_keeps(r20, 4, per_resolution=True)
    extra = [k for k in keeps if k not in plain]
    assert extra == ["removed_16x16", "removed_32x32", "removed_8x8"]
    for name in extra:
        site = name.removeprefix("removed_")
        gone = {layer_site(layer) for layer, (ci, co) in zip(r20.layers, r20.widths(keeps[name])) if ci == 0 or co == 0}
        assert gone == {site}, name  # only blocks of that resolution are removed, and some are
        assert not (keeps[name] ^ r20.full_keep()).logical_not().all()


def test_cost_model_weighs_layers_by_resolution(r20):
    table = fake_table(r20)
    plain = CostModel(r20, "latency", table)
    table.model["calibration"]["layer_weights"] = {"32x32": 2.0, "8x8": 0.5}
    weighted = CostModel(r20, "latency", table)
    keep = r20.full_keep()
    for layer, a, b in zip(r20.layers, plain.layer_costs(keep).tolist(), weighted.layer_costs(keep).tolist()):
        assert b == pytest.approx(a * {"32x32": 2.0, "8x8": 0.5}.get(layer_site(layer), 1.0)), layer.name


def test_fit_whole_model_writes_consistent_points(r20):
    """The points' layer sums are the weighted sums the allocator budgets, so the closed loop's
    re-fit (scale, removed cost) on them stays consistent with the cost model built from the table."""
    table = fake_table(r20)
    keeps = calibration_keeps(r20, 4, per_resolution=True)
    cost = CostModel(r20, "latency", table)
    cost.removed_cost = 0.0
    ms = {}
    for k, v in keeps.items():
        by_site: dict[str, float] = {}
        for layer, c in zip(r20.layers, cost.layer_costs(v).tolist()):
            by_site[layer_site(layer)] = by_site.get(layer_site(layer), 0.0) + c
        ms[k] = _measured(by_site, r20.removed_layers(v))
    cal = fit_whole_model(r20, table, keeps, ms, per_resolution=True)
    assert cal["form"] == "per_resolution" and set(cal["layer_weights"]) >= set(TRUE)
    table.model["calibration"] = cal
    fitted = CostModel(r20, "latency", table)
    for p, (k, v) in zip(cal["points"], keeps.items()):
        assert p["layer_sum_ms"] == pytest.approx(fitted.total(v) - fitted.removed_cost * p["removed_layers"])
        # within the linear layer's share (< 0.1 %): the fit merges its site into the largest one
        assert fitted.predict(v) == pytest.approx(ms[k], rel=2e-3), k
    # the global form on the same points: one scale, no weights
    glob = fit_whole_model(r20, table, keeps, ms)
    assert glob["form"] == "global" and glob["layer_weights"] == {}


def test_recipe_key_is_validated():
    assert load_recipe("cifar10_resnet56_2x", []).profile.calibration == "per_resolution"
    assert load_recipe("quickstart", []).profile.calibration == "global"
    with pytest.raises(SmcpError, match="calibration"):
        load_recipe("quickstart", ["profile.calibration=per_stage"])
