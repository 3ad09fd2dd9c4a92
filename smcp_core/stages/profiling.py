"""The profile stage: the latency table of the recipe's model and its whole-model calibration."""

from __future__ import annotations

import math
import time
from pathlib import Path

import torch

from smcp_core.config.recipe import Recipe
from smcp_core.errors import SmcpError
from smcp_core.events import Reporter
from smcp_core.export.tensorrt import ensure_tensorrt
from smcp_core.profile.calibration import MIN_WEIGHT, fit_calibration, fit_resolution_calibration
from smcp_core.profile.cost_model import CostModel, layer_site
from smcp_core.profile.measure import measure_table
from smcp_core.profile.table import LatencyTable
from smcp_core.stages.artifacts import stamp
from smcp_core.stages.builders import build_graph, build_model, input_shape
from smcp_core.stages.measure import (
    Bench,
    calibration_keeps,
    measure_against_baseline,
    measure_lowest,
    removal_site,
    slim_structure,
)
from smcp_core.stages.results import ProfileResult
from smcp_core.utils.fsutil import (
    atomic_write_json,
    remove_artifact,
)

PARTIAL_TABLE = "latency.partial.json"
"""The points measured by a ``smcp profile`` that ran out of its time budget (or was interrupted),
beside ``latency.json``; the next ``smcp profile`` in the same run directory measures only the
missing points, and removes it once ``latency.json`` is written."""

TRT_TIMING_CACHE = "trt_timing.cache"
"""The TensorRT timing cache of ``smcp profile`` (backend tensorrt), beside ``latency.json``: every
layer engine and the whole-model engines of the calibration (built in ``.profile_tmp``, whose
:class:`~smcp_core.stages.measure.TrtPlan` default is this file) share it, and later runs reuse it."""


def profile(recipe: Recipe, out: Path, *, reporter: Reporter | None = None, force: bool = False) -> ProfileResult:
    """Measure the latency table of the recipe's model and the whole-model calibration.

    Points of ``OUT/latency.json`` and of ``OUT/latency.partial.json`` (what an earlier run measured
    before its time budget ran out) that were measured with the same settings on this machine are
    reused (``force``: neither is read); when the budget runs out before the coarse grid is measured,
    the points measured so far are written to ``OUT/latency.partial.json`` and
    :class:`~smcp_core.profile.table.TableBudgetExceeded` says so.
    """

    rep = reporter or Reporter()
    prof = recipe.profile
    out.mkdir(parents=True, exist_ok=True)
    path = out / "latency.json"
    if prof.backend == "tensorrt":
        ensure_tensorrt()  # one clear line when TensorRT or a GPU is missing
    model = build_model(recipe, load_weights=False)  # latency does not depend on the weights
    graph = build_graph(recipe, model)
    partial_path = out / PARTIAL_TABLE
    existing = [] if force else _cached_tables(path, partial_path, rep)
    t0 = time.perf_counter()
    dense_before = _dense_ms(recipe, model, out)
    sigs = [layer.sig for layer in graph.layers]
    table = measure_table(
        sigs, backend=prof.backend, batch_size=prof.batch_size, dtype=prof.dtype, layout=prof.layout,
        device=prof.device, channel_step=prof.channel_step, threads=prof.threads, warmup=prof.warmup,
        min_runs=prof.min_runs, max_seconds=prof.max_seconds, existing=existing, partial_path=partial_path,
        progress=lambda d, t, k: rep.progress("profile", d, t, k),
        trt_timing_cache=out / TRT_TIMING_CACHE if prof.backend == "tensorrt" else None,
    )
    t_layers = time.perf_counter() - t0
    dense_after = _dense_ms(recipe, model, out)
    whole = calibrate(graph, table, model=model, source=recipe, where=recipe, workdir=out / ".profile_tmp",
                      reporter=rep, min_rounds=max(100, 5 * prof.min_runs),
                      max_seconds=min(20.0, prof.max_seconds / 20))
    table.model = {
        "stamp": stamp(recipe, "profile"),
        "model_source": recipe.model.source,
        "input_shape": list(input_shape(recipe)),
        **whole,
        "drift": _drift(rep, {"before_layers": dense_before, "after_layers": dense_after,
                              "calibration": whole["measured_ms"]}),
        "seconds": {"layers": t_layers, "total": time.perf_counter() - t0},
    }
    atomic_write_json(path, table.to_dict(), indent=1, checksum=True)
    remove_artifact(partial_path)  # its points are in latency.json now
    table.path = path
    return _result(table, whole, time.perf_counter() - t0)


def _cached_tables(path: Path, partial_path: Path, rep: Reporter) -> list[LatencyTable]:
    """The tables whose points a profile re-uses: an interrupted profile's partial table (a corrupt
    one is ignored: it is only a cache) and the finished one (a corrupt one stops here, one line)."""
    existing = []
    if partial_path.exists():
        try:
            existing.append(LatencyTable.load(partial_path))
            rep.log(f"resuming the latency table from {partial_path} (points measured with other settings "
                    "or on another machine are measured again)")
        except SmcpError as exc:
            rep.log(f"warning: ignoring the partial latency table ({exc})")
    if path.exists():
        try:  # never silently replaced
            existing.append(LatencyTable.load(path))
        except SmcpError as exc:
            raise SmcpError(f"{exc}; `smcp profile --force` re-measures it from scratch") from None
    return existing


def _result(table: LatencyTable, whole: dict, seconds: float) -> ProfileResult:
    cal = whole["calibration"]
    return ProfileResult(
        path=str(table.path), layers=len(table), baseline_ms=whole["measured_ms"], scale=cal["scale"],
        offset_ms=cal["offset_ms"], removed_layer_ms=cal["removed_layer_ms"], seconds=seconds,
        interpolated_points=int(table.meta.get("measure", {}).get("interpolated_points", 0) or 0),
        calibration=cal["points"], baseline_spread_ms=_spread(whole["stats"]["baseline"]),
        calibration_form=cal.get("form"), layer_weights=cal.get("layer_weights") or {})


def calibrate(graph, table: LatencyTable, *, model: torch.nn.Module, source: Recipe | torch.nn.Module,
              where: Recipe | Bench, workdir: Path, reporter: Reporter, min_rounds: int = 100,
              max_seconds: float = 20.0) -> dict:
    """The whole-model part of ``latency.json``'s ``model``: the dense ``model`` (the graph's
    submodule inside it, if any) and its slimmed variants (of ``source``: the recipe, or a plain
    model copied), each variant timed paired with the dense model on ``where``'s backend as the
    export gate times it (:func:`~smcp_core.stages.measure.measure_against_baseline`, at most
    ``max_seconds`` per pair), and the calibration fitted to them (:func:`fit_whole_model`;
    ``per_resolution`` when ``where``'s ``profile.calibration`` says so):
    ``{measured_ms, layer_sum_ms, calibration, stats}``.  (Timed in one loop over all variants, the
    small ones ran colder and 5-17 % slower relative to the dense model than the gate measures them
    at batch 1, which the calibration then carried into every prediction.)"""
    per_resolution = where.profile.calibration == "per_resolution"
    step = source.prune.channel_round if isinstance(source, Recipe) else (table.channel_step or 1)
    keeps = calibration_keeps(graph, step, per_resolution=per_resolution)
    reporter.log(f"measuring whole-model latency ({', '.join(keeps)}) for calibration, "
                 "each paired with the dense model")
    variants = {name: (model if name == "baseline" else slim_structure(source, graph, keep))
                for name, keep in keeps.items()}
    meas = measure_against_baseline(variants, where, workdir=workdir, min_rounds=min_rounds, max_seconds=max_seconds)
    cal = fit_whole_model(graph, table, keeps, meas["ms"], per_resolution=per_resolution)
    if per_resolution and cal["form"] != "per_resolution":
        reporter.log("warning: profile.calibration is per_resolution, but the calibration variants cannot "
                     "separate the resolutions' weights (a resolution with most of the layer time has no "
                     "removable block of its own, or a weight came out below "
                     f"{MIN_WEIGHT:g}): the global calibration is used (latency.json calibration.form)")
    cal["measurement"] = "each variant paired with the dense model, as the export gate"
    for point in cal["points"][1:]:
        iv = meas["speedup"][point["name"]]
        point["speedup"] = {"median": iv.median, "interval": [iv.lo, iv.hi], "rounds": iv.n}
    return {"measured_ms": float(meas["ms"]["baseline"]), "layer_sum_ms": cal["points"][0]["layer_sum_ms"],
            "calibration": cal, "stats": meas["stats"]}


def fit_whole_model(graph, table: LatencyTable, keeps: dict[str, torch.Tensor], ms: dict[str, float], *,
                    per_resolution: bool = False) -> dict:
    """The calibration of ``table`` fitted to whole-model latencies ``ms`` of the structures ``keeps``
    (the first one dense), as ``latency.json`` stores it.

    Global (proportional): measured ~= scale * (sum of layer latencies + removed_ms * removed
    layers).  The work outside conv/linear layers (activations, adds, pooling, per-op overhead)
    shrinks with the layers, so a constant offset would be wrong for strongly pruned models (seen on
    onnxruntime CPU: a fitted offset made a 2x target demand a 4x cut of the layer time); a removed
    layer leaves its residual join behind, hence the per-removed-layer term.  ``per_resolution``
    also fits one weight per output resolution of the layers (``layer_weights``, relative to the
    dense model's scale): at batch 1 the single-layer table over-states the small late-stage layers
    most (ResNet-56 on onnxruntime CPU: scale 0.82 / 0.77 / 0.59 at 32x32 / 16x16 / 8x8); only
    when every resolution with a large share of the layer time has a variant of its own
    (``removed_<HxW>``, see :func:`~smcp_core.stages.measure.calibration_keeps`): otherwise, or when a
    weight comes out implausibly small, the global fit is kept (``form`` says which)."""
    cost = CostModel(graph, "latency", table)
    cost.removed_cost = 0.0  # plain layer sums (a reused table carries the previous calibration)
    cost.set_layer_weights({})
    removed = {k: graph.removed_layers(v) for k, v in keeps.items()}
    fitted = None
    if per_resolution:
        by_site = {k: _sums_by_site(graph, cost, v) for k, v in keeps.items()}
        own = {removal_site(k) for k in keeps} - {None}
        fitted = fit_resolution_calibration([(by_site[k], removed[k], ms[k]) for k in keeps],
                                            by_site[next(iter(keeps))], separated=own)
    if fitted is None:
        scale, removed_ms, weights = (*fit_calibration([(cost.total(v), removed[k], ms[k])
                                                        for k, v in keeps.items()]), {})
    else:
        scale, removed_ms, weights = fitted
    cost.set_layer_weights(weights)
    sums = {k: cost.total(v) for k, v in keeps.items()}  # weighted: what the allocator budgets
    return {"scale": scale, "offset_ms": 0.0, "removed_layer_ms": removed_ms, "layer_weights": weights,
            "form": "per_resolution" if fitted else "global",
            "points": [{"name": k, "layer_sum_ms": float(sums[k]), "removed_layers": removed[k],
                        "measured_ms": float(ms[k]), "predicted_ms": float(scale * (sums[k] + removed_ms * removed[k]))}
                       for k in keeps]}


def _sums_by_site(graph, cost: CostModel, keep: torch.Tensor) -> dict[str, float]:
    """The layer latencies of a structure summed per :func:`~smcp_core.profile.cost_model.layer_site`
    (removed layers cost nothing here)."""
    out: dict[str, float] = {}
    for layer, c in zip(graph.layers, cost.layer_costs(keep).tolist()):
        out[layer_site(layer)] = out.get(layer_site(layer), 0.0) + c
    return out


def _spread(stats: dict) -> list[float] | None:
    return [stats["p10_ms"], stats["p90_ms"]] if "p10_ms" in stats and "p90_ms" in stats else None


DRIFT_LIMIT = 0.10  # the dense model's latency may change this much while profiling before it is reported


def _dense_ms(recipe: Recipe, model: torch.nn.Module, out: Path) -> float:
    """A short measurement of the dense model alone (median ms), to see the machine's speed change."""
    prof = recipe.profile
    meas = measure_lowest({"baseline": model}, recipe, workdir=out / ".profile_tmp", repeats=1,
                          min_runs=max(10, prof.min_runs // 2), max_seconds=min(3.0, prof.max_seconds / 20))
    return float(meas["stats"]["baseline"]["median_ms"])


def _drift(rep: Reporter, dense_ms: dict[str, float]) -> dict:
    """``latency.json``'s ``model.drift``: the dense model timed before and after the layer sweep and
    at calibration; above :data:`DRIFT_LIMIT` (slowest / fastest - 1) one line says the machine's
    speed changed and the table's layer times may be off by that much."""
    lo, hi = min(dense_ms.values()), max(dense_ms.values())
    drift = hi / lo - 1.0 if lo > 0 else math.inf
    doc = {"dense_ms": dense_ms, "drift": drift, "limit": DRIFT_LIMIT, "ok": drift <= DRIFT_LIMIT}
    if not doc["ok"]:
        times = ", ".join(f"{v:.4g} ms {k.replace('_', ' ')}" for k, v in dense_ms.items())
        doc["note"] = (f"the machine's speed changed while profiling: the dense model took {times} "
                       f"({100 * drift:.0f} % apart); the layer times may be off by as much (the closed loop and "
                       "the export gate measure ratios and are not affected); re-run `smcp profile --force` on a "
                       "quieter machine for a better table")
        rep.log(f"warning: {doc['note']}")
    return doc
