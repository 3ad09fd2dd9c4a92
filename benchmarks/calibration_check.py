"""How well does the latency table predict whole slimmed models?  Predicted vs measured latency of
pruned structures, with the old calibration (proportional to the layer sum, fitted on the baseline
and two uniformly thinned models) and the current one (plus a per-removed-layer term, fitted with two
extra variants that remove every other removable residual block).

    python benchmarks/calibration_check.py --table runs/r56/latency.json --runs runs/r56 --random 3

1. ``smcp profile`` for ``--recipe`` into a scratch directory; with ``--table`` the layer points of
   that table are re-used (same machine fingerprint), so only the whole-model calibration is
   measured (under a minute for ResNet-56 on a 2-core CPU).
2. The structures checked: the keep-masks of the ``--runs`` run directories (``prune/pruned.pt``)
   and ``--random`` random structures (a random uniform width fraction, then a random subset of the
   removable residual blocks removed).
3. Every structure (random weights: latency does not depend on them) is timed paired with the
   dense model, as the export gate times a pruned model
   (:func:`smcp_core.stages.measure.measure_against_baseline`, at least 5 s per pair): its
   ``measured_speedup`` is the median of the per-round ratios, ``measured`` the table's dense latency
   over it, so what is compared is the speed-up the table predicts against the one the gate would
   measure.  (Timed in one loop over all models instead, small models ran 5-17 % slower relative to
   the dense one than in pairs.)
4. The profile's calibration structures (:func:`smcp_core.stages.measure.calibration_keeps`) are
   timed the same way and the calibration is fitted again on them (``loop_calibration``): its
   predictions (``error_loop_pct``) say how well the layer model predicts when the machine has not
   changed since its calibration was measured; ``error_pct`` is the table as profiled.
5. Printed and written to ``--out`` (default ``benchmarks/results/calibration_check.json``): layer
   sum, removed layers, the speed-ups, the predictions and their errors, the mean and max absolute
   error of both.
"""

from __future__ import annotations

import argparse
import random
import shutil
import sys
import tempfile
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from smcp_core import stages  # noqa: E402
from smcp_core.config.recipe import load_recipe  # noqa: E402
from smcp_core.profile import calibration as profile_calibration  # noqa: E402
from smcp_core.profile.cost_model import CostModel  # noqa: E402
from smcp_core.profile.fingerprint import environment_report  # noqa: E402
from smcp_core.profile.table import LatencyTable  # noqa: E402
from smcp_core.prune.allocator import uniform_keep  # noqa: E402
from smcp_core.stages.measure import calibration_keeps  # noqa: E402
from smcp_core.stages.profiling import fit_whole_model  # noqa: E402
from smcp_core.utils.fsutil import atomic_write_json, load_torch  # noqa: E402


def random_keep(graph, rng: random.Random, step: int) -> torch.Tensor:
    keep = uniform_keep(graph, rng.uniform(0.4, 1.0), step)
    removable = [g for g in graph.groups if g.prunable and g.removable and g.n_frozen == 0]
    for g in rng.sample(removable, k=rng.randint(1, max(1, len(removable) * 2 // 3))) if removable else []:
        keep[g.classes] = False
    return keep


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--recipe", default="cifar10_resnet56_2x")
    ap.add_argument("--set", dest="sets", action="append", default=[])
    ap.add_argument("--table", type=Path, help="latency.json whose layer points are re-used")
    ap.add_argument("--runs", type=Path, nargs="*", default=[], help="run directories with prune/pruned.pt")
    ap.add_argument("--random", type=int, default=3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "calibration_check.json")
    return ap.parse_args(argv)


def old_calibration(graph, recipe, plain: CostModel, cal: dict) -> float:
    """The old calibration's scale: proportional, fitted on the baseline and the uniformly thinned models."""
    per_res = recipe.profile.calibration == "per_resolution"
    keeps = calibration_keeps(graph, recipe.prune.channel_round, per_resolution=per_res)
    scale, _ = profile_calibration.fit_calibration(
        [(plain.total(keeps[p["name"]]), 0, p["measured_ms"]) for p in cal["points"] if not p.get("removed_layers")])
    return scale


def structures(a: argparse.Namespace, graph, recipe) -> tuple[dict, dict]:
    """The structures checked (the runs' pruned masks, then random ones) and their run directories."""
    keeps, runs = {}, {}  # structure name (also a file name while timing) -> keep / its run directory
    for i, run in enumerate(a.runs):
        ck = load_torch(run / "prune" / "pruned.pt", "pruned checkpoint", "", keys=("keep",))
        keeps[f"smcp{i}"] = ck["keep"].to(torch.bool)
        runs[f"smcp{i}"] = str(run)
    rng = random.Random(a.seed)
    for i in range(a.random):
        keeps[f"random{i}"] = random_keep(graph, rng, recipe.prune.channel_round)
    return keeps, runs


def loop_cost_model(graph, table, loop_keeps: dict, med: dict, per_res: bool) -> tuple[dict, CostModel]:
    """The same calibration fitted again on its structures timed in THIS check: what the layer model
    predicts when the machine has not changed since the calibration was measured."""
    loop_cal = fit_whole_model(graph, table, loop_keeps, med, per_resolution=per_res)
    loop_cost = CostModel(graph, "latency", table)
    loop_cost.scale, loop_cost.removed_cost = loop_cal["scale"], loop_cal["removed_layer_ms"]
    loop_cost.set_layer_weights(loop_cal["layer_weights"])
    return loop_cal, loop_cost


def row(name: str, keep, graph, costs: dict, old_scale: float, meas: dict, norm: float, base_ms: float,
        run: str | None) -> dict:
    """One structure: measured (paired with the dense model) against the old, current and in-loop predictions."""
    med = meas["ms"]
    s = costs["plain"].total(keep)
    meas_ms = med[name] * norm  # the table's dense latency over the paired speed-up
    new_pred, old_pred, loop_pred = costs["table"].predict(keep), old_scale * s, costs["loop"].predict(keep)
    iv = meas["speedup"][name]
    return {"structure": name, "run": run, "layer_sum_ms": s, "removed_layers": graph.removed_layers(keep),
            "measured_speedup": iv.median, "measured_speedup_interval": [iv.lo, iv.hi],
            "predicted_speedup": base_ms / new_pred,
            "measured_ms": meas_ms, "measured_raw_ms": med[name], "predicted_old_ms": old_pred,
            "predicted_ms": new_pred, "error_old_pct": 100 * (old_pred - meas_ms) / meas_ms,
            "error_pct": 100 * (new_pred - meas_ms) / meas_ms, "predicted_loop_ms": loop_pred,
            "error_loop_pct": 100 * (loop_pred - med[name]) / med[name]}


def check(a: argparse.Namespace, work: Path) -> dict:
    """Profile (re-using ``--table``'s points), time every structure paired with the dense model, compare."""
    recipe = load_recipe(a.recipe, a.sets)
    if a.table:
        shutil.copyfile(a.table, work / "latency.json")
    info = stages.profile(recipe, work).to_dict()
    table = LatencyTable.load(work / "latency.json")
    model = stages.build_model(recipe, load_weights=False)
    graph = stages.build_graph(recipe, model)
    plain = CostModel(graph, "latency", table)  # unweighted layer sums, for the old calibration
    plain.removed_cost = 0.0
    plain.set_layer_weights({})
    cal = table.model["calibration"]
    per_res = recipe.profile.calibration == "per_resolution"
    old_scale = old_calibration(graph, recipe, plain, cal)
    keeps, runs = structures(a, graph, recipe)
    variants = {f"cal_{k}": v for k, v in
                calibration_keeps(graph, recipe.prune.channel_round, per_resolution=per_res).items()
                if k != "baseline"}
    models = {"dense": model, **{name: stages.slim_structure(recipe, graph, keep)
                                 for name, keep in {**keeps, **variants}.items()}}
    prof = recipe.profile
    meas = stages.measure_against_baseline(models, recipe, workdir=work / "t", baseline="dense",
                                           min_rounds=max(100, 5 * prof.min_runs), min_seconds=5.0)
    med = meas["ms"]
    base_ms = float(table.model["measured_ms"])
    loop_keeps = {"dense": graph.full_keep(), **variants}
    loop_cal, loop_cost = loop_cost_model(graph, table, loop_keeps, med, per_res)
    costs = {"plain": plain, "table": CostModel(graph, "latency", table), "loop": loop_cost}
    rows = [row(name, keep, graph, costs, old_scale, meas, base_ms / med["dense"], base_ms, runs.get(name))
            for name, keep in keeps.items()]
    summary = {key: {"mae_pct": sum(abs(r[key]) for r in rows) / len(rows),
                     "max_pct": max(abs(r[key]) for r in rows)} for key in ("error_pct", "error_loop_pct")}
    return {"recipe": recipe.name, "sets": a.sets, "backend": prof.backend, "device": prof.device,
            "batch_size": prof.batch_size, "calibration": cal, "old_scale": old_scale,
            "table_dense_ms": base_ms, "loop_dense_ms": med["dense"],
            "loop_calibration": {**{k: v for k, v in loop_cal.items() if k != "points"},
                                 "measured_ms": {k: med[k] for k in loop_keeps}},
            "summary": summary, "rows": rows, "profile_seconds": info["seconds"],
            "environment": environment_report(backend=prof.backend, device=prof.device, threads=prof.threads,
                                              batch_size=prof.batch_size)}


def report(res: dict) -> None:
    """The check as a markdown table and two summary lines on stdout."""
    cal, rows, summary = res["calibration"], res["rows"], res["summary"]
    print(f"calibration ({cal.get('form', 'global')}, layer weights {cal.get('layer_weights') or '-'}): "
          f"scale {cal['scale']:.3f}, {cal.get('removed_layer_ms', 0):.4f} ms per removed layer "
          f"(old: proportional {res['old_scale']:.3f}); dense {res['table_dense_ms']:.3f} ms (table) / "
          f"{res['loop_dense_ms']:.3f} ms (this loop)")
    print("| structure | removed layers | measured ms | predicted, old calibration "
          "| predicted, with removed-layer term | calibration re-fitted in this loop: measured, predicted |")
    print("|---|---:|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['structure']} | {r['removed_layers']} | {r['measured_ms']:.3f} | {r['predicted_old_ms']:.3f} "
              f"({r['error_old_pct']:+.1f}%) | {r['predicted_ms']:.3f} ({r['error_pct']:+.1f}%) "
              f"| {r['measured_raw_ms']:.3f}, {r['predicted_loop_ms']:.3f} ({r['error_loop_pct']:+.1f}%) |")
    for key, label in (("error_pct", "as profiled"), ("error_loop_pct", "re-fitted in this loop")):
        print(f"{label}: mean absolute error {summary[key]['mae_pct']:.1f} %, max {summary[key]['max_pct']:.1f} %")
    for p in cal["points"]:
        print(f"  calibration point {p['name']}: measured {p['measured_ms']:.3f} predicted {p['predicted_ms']:.3f}")


def main(argv=None) -> None:
    a = parse_args(argv)
    work = Path(tempfile.mkdtemp(prefix="smcp_calcheck_"))
    try:
        res = check(a, work)
        atomic_write_json(a.out, res)
        report(res)
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
