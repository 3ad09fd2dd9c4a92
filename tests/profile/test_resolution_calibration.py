"""The per-resolution calibration (``profile.calibration: per_resolution``): its fit, the removal
variants that separate the resolutions, and the layer weights the cost model applies."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn
from chain_support import fake_layer_latency, fake_table, paired_from_ms
from conftest import tiny_recipe

from smcp_core import stages
from smcp_core.config.recipe import load_recipe
from smcp_core.errors import SmcpError
from smcp_core.graph.channel_graph import ChannelGraph
from smcp_core.models import build_model
from smcp_core.profile import measure as profile_measure
from smcp_core.profile.calibration import MIN_WEIGHT, fit_resolution_calibration
from smcp_core.profile.cost_model import CostModel, layer_site
from smcp_core.profile.table import LatencyTable
from smcp_core.stages import profiling
from smcp_core.stages.builders import build_model as build_recipe_model
from smcp_core.stages.builders import example_input
from smcp_core.stages.measure import calibration_keeps, removal_site
from smcp_core.stages.profiling import _sums_by_site, fit_whole_model
from smcp_core.utils.text import layer_weights_text

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
    ms = {k: _measured(_sums_by_site(r20, cost, v), r20.removed_layers(v)) for k, v in keeps.items()}
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


def test_plain_variants_cannot_separate_the_resolutions(r20):
    """Uniformly thinned and every-other-block variants shrink every resolution alike: without a
    variant of its own per resolution the per-resolution fit is refused and the global one kept."""
    table = fake_table(r20)
    keeps = calibration_keeps(r20, 4)  # no removed_<site> variants
    cost = CostModel(r20, "latency", table)
    cost.removed_cost = 0.0
    ms = {k: _measured(_sums_by_site(r20, cost, v), r20.removed_layers(v)) for k, v in keeps.items()}
    cal = fit_whole_model(r20, table, keeps, ms, per_resolution=True)
    assert cal["form"] == "global" and cal["layer_weights"] == {}


def _runtime_ms(model: nn.Module, x: torch.Tensor, batch: int) -> float:
    """A fake whole-model runtime: every conv/linear costs what the fake layer table says
    (:func:`fake_layer_latency`) times the true weight of its output resolution."""
    total = []

    def hook(mod, inp, out):
        hw = out.shape[-2] * out.shape[-1] if out.dim() == 4 else 1
        site = f"{out.shape[-2]}x{out.shape[-1]}" if out.dim() == 4 else "1x1"
        k = mod.kernel_size[0] * mod.kernel_size[1] if isinstance(mod, nn.Conv2d) else 1
        cin = mod.in_channels if isinstance(mod, nn.Conv2d) else mod.in_features
        cout = mod.out_channels if isinstance(mod, nn.Conv2d) else mod.out_features
        total.append(TRUE_TINY.get(site, 0.9) * (0.002 + cin * cout * k * hw * batch * 1e-7))

    handles = [m.register_forward_hook(hook) for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    with torch.no_grad():
        model.eval()(x)
    for h in handles:
        h.remove()
    return sum(total)


TRUE_TINY = {"32x32": 0.8, "16x16": 1.0, "8x8": 0.6}  # the quickstart's resolutions (digits at 32x32)


def test_smcp_profile_fits_and_stores_per_resolution_weights(monkeypatch, tmp_path):
    """``smcp profile`` with ``profile.calibration: per_resolution`` on a runtime whose resolutions
    cost differently: latency.json holds the weights, and a later process's cost model (the table
    re-loaded) predicts every calibration structure with them."""
    recipe = tiny_recipe("profile.calibration=per_resolution", "profile.min_runs=1", "profile.warmup=1",
                         "profile.channel_step=4", "prune.channel_round=4")
    batch = recipe.profile.batch_size
    x = example_input(recipe, 1)

    def paired(models, where, *, baseline="baseline", **kw):
        return paired_from_ms({k: _runtime_ms(m, x, batch) for k, m in models.items()}, baseline)

    monkeypatch.setattr(profile_measure, "_measure_point", fake_layer_latency)
    monkeypatch.setattr(profiling, "measure_against_baseline", paired)
    res = stages.profile(recipe, tmp_path)
    assert res.calibration_form == "per_resolution"
    table = LatencyTable.load(tmp_path / "latency.json")
    cal = table.model["calibration"]
    assert cal["form"] == "per_resolution" and set(cal["layer_weights"]) >= set(TRUE_TINY)
    for site, a in TRUE_TINY.items():  # the effective scale of each resolution is recovered
        assert cal["scale"] * cal["layer_weights"][site] == pytest.approx(a, rel=0.02), site
    assert [p["name"] for p in cal["points"]][-3:] == ["removed_16x16", "removed_32x32", "removed_8x8"]
    graph = ChannelGraph(build_recipe_model(recipe, load_weights=False), x)
    cost = CostModel(graph, "latency", table)
    keeps = calibration_keeps(graph, 4, per_resolution=True)
    for p in cal["points"]:
        assert cost.predict(keeps[p["name"]]) == pytest.approx(p["measured_ms"], rel=0.02), p["name"]


@pytest.mark.parametrize("weights", [[1.0], {"8x8": "fast"}, {"8x8": 0}, {"8x8": True}])
def test_a_malformed_layer_weights_entry_is_one_clear_line(r20, weights):
    table = fake_table(r20)
    table.model["calibration"]["layer_weights"] = weights
    with pytest.raises(SmcpError, match=r"calibration\.layer_weights must map output resolutions .*smcp profile"):
        CostModel(r20, "latency", table)


def test_only_a_per_resolution_calibration_enters_the_stamps(monkeypatch):
    """``global`` (the default, and what every table before the key was) is left out of the hash,
    so existing runs stay up to date; ``per_resolution`` is a different table: every stage re-runs."""
    from smcp_core.stages import artifacts

    plain, per_res = tiny_recipe(), tiny_recipe("profile.calibration=per_resolution")
    assert all(artifacts.stamp(plain, s) != artifacts.stamp(per_res, s) for s in ("profile", "prune", "slim", "export"))
    hashed = []
    real = artifacts._digest
    monkeypatch.setattr(artifacts, "_digest", lambda *parts: hashed.append(parts) or real(*parts))
    artifacts.stamp(plain, "profile")
    profile_section = hashed[0][1]
    assert "calibration" not in profile_section and "batch_size" in profile_section


def test_variant_names_and_weights_text():
    """The ``removed_<HxW>`` names the fit reads its separating variants by, and the weights as
    ``smcp profile`` and ``smcp report`` print them (largest resolution first)."""
    assert [removal_site(n) for n in ("removed_16x16", "removed_uniform75", "removed", "baseline")] == \
        ["16x16", None, None, None]
    assert layer_weights_text({"8x8": 0.82, "1x1": 0.8, "32x32": 1.14, "16x16": 1.08}) == \
        "32x32 1.14, 16x16 1.08, 8x8 0.82, 1x1 0.80"
    assert layer_weights_text({"8x8": "fast", "32x32": 1}) == "32x32 1.00, 8x8 n/a"
