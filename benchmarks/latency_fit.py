"""What can a calibration of the layer table predict?  Many random structures timed as whole models,
then candidate calibrations (linear in per-structure features) fitted and scored leave-one-out.

    python benchmarks/latency_fit.py --recipe cifar10_resnet56_2x --structures 40

1. ``smcp profile`` of ``--recipe`` into a scratch directory (the layer table and the shipped
   calibration).
2. ``--structures`` random structures the allocator could produce: a random width fraction per
   structure, jittered per group and rounded to ``prune.channel_round`` (at least
   ``prune.min_channels``); with ``prune.layer_pruning`` a random share of the removable groups removed.
3. The dense model and every structure (random weights) timed interleaved in one loop, twice; per
   model the lower median (:func:`smcp_core.stages.measure.measure_lowest`).
4. Per structure the features: layer sum of the table ``S``, removed layers ``R``, present layers
   whose input or output width is off the runtime's channel block ``M`` (``--block``, 8: MLAS's
   NCHWc block on AVX2), and the table sum of those layers ``Sm``.  Each candidate calibration is
   fitted by least squares; its in-sample and leave-one-out mean/max absolute errors are printed and
   written to ``--out`` (default ``benchmarks/results/latency_fit.json``) with the raw rows.
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
from smcp_core.profile.cost_model import CostModel  # noqa: E402
from smcp_core.profile.fingerprint import environment_report  # noqa: E402
from smcp_core.profile.table import LatencyTable  # noqa: E402
from smcp_core.utils.fsutil import atomic_write_json  # noqa: E402

CANDIDATES = {
    "shipped: scale*(S + r*R)": ["S", "R"],
    "scale*S": ["S"],
    "S, R, offset": ["S", "R", "one"],
    "S, R, off-block layers": ["S", "R", "M"],
    "aligned S, off-block S, R": ["Sa", "Sm", "R"],
    "aligned S, off-block S, R, off-block layers": ["Sa", "Sm", "R", "M"],
}


def random_structure(graph, rng: random.Random, channel_round: int, min_channels: int,
                     layer_pruning: bool) -> torch.Tensor:
    keep = graph.full_keep()
    frac = rng.uniform(0.25, 1.0)
    p_remove = rng.choice([0.0, rng.uniform(0.0, 0.8)]) if layer_pruning else 0.0
    gen = torch.Generator().manual_seed(rng.randrange(2**31))
    for g in graph.groups:
        if not g.prunable:
            continue
        keep[g.classes] = False
        if g.removable and g.n_frozen == 0 and rng.random() < p_remove:
            continue
        f = min(1.0, max(0.0, frac * rng.uniform(0.7, 1.3)))
        k = int(round(f * g.size / channel_round)) * channel_round
        k = max(min(min_channels, g.size), g.n_frozen, min(k, g.size), 1)
        keep[g.classes[torch.randperm(g.size, generator=gen)[:k]]] = True
    return keep


def features(graph, cost: CostModel, keep: torch.Tensor, block: int) -> dict[str, float]:
    f = {"S": 0.0, "R": 0.0, "M": 0.0, "Sa": 0.0, "Sm": 0.0, "one": 1.0}
    for layer, ci, co, c in zip(graph.layers, *cost.widths(keep), cost.layer_costs(keep).tolist()):
        if ci == 0 or co == 0:
            f["R"] += 1
            continue
        first = layer.sig.cin <= 4  # the stem reads the image's few channels
        off = layer.sig.kind != "linear" and ((ci % block != 0 and not first) or co % block != 0)
        f["S"] += c
        f["M"] += off
        f["Sm" if off else "Sa"] += c
    return f


def lstsq(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return torch.linalg.lstsq(x, y.view(-1, 1)).solution.view(-1)


def score(rows: list[dict], cols: list[str]) -> dict:
    x = torch.tensor([[r["features"][c] for c in cols] for r in rows], dtype=torch.float64)
    y = torch.tensor([r["measured_ms"] for r in rows], dtype=torch.float64)
    coef = lstsq(x, y)
    err = ((x @ coef - y) / y * 100).abs()
    loo = []
    for i in range(len(rows)):
        m = torch.arange(len(rows)) != i
        loo.append(float(((x[i] @ lstsq(x[m], y[m]) - y[i]) / y[i] * 100).abs()))
    loo_t = torch.tensor(loo)
    return {"features": cols, "coef": coef.tolist(), "fit_mae_pct": float(err.mean()), "fit_max_pct": float(err.max()),
            "loo_mae_pct": float(loo_t.mean()), "loo_max_pct": float(loo_t.max())}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--recipe", default="cifar10_resnet56_2x")
    ap.add_argument("--set", dest="sets", action="append", default=[])
    ap.add_argument("--structures", type=int, default=40)
    ap.add_argument("--block", type=int, default=8)
    ap.add_argument("--seconds", type=float, default=240.0, help="budget of each of the two timing loops")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "latency_fit.json")
    a = ap.parse_args()

    recipe = load_recipe(a.recipe, a.sets)
    work = Path(tempfile.mkdtemp(prefix="smcp_latfit_"))
    try:
        stages.profile(recipe, work)
        table = LatencyTable.load(work / "latency.json")
        model = stages.build_model(recipe, load_weights=False)
        graph = stages.build_graph(recipe, model)
        cost = CostModel(graph, "latency", table)
        cost.removed_cost = 0.0  # plain layer sums
        p = recipe.prune
        rng = random.Random(a.seed)
        keeps = {"dense": graph.full_keep(), **{
            f"s{i}": random_structure(graph, rng, p.channel_round, p.min_channels, p.layer_pruning)
            for i in range(a.structures)}}
        models = {k: model if k == "dense" else stages.slim_structure(recipe, graph, v) for k, v in keeps.items()}
        st = stages.measure_lowest(models, recipe, workdir=work / "t", repeats=2, min_runs=30,
                                   max_seconds=a.seconds)["stats"]
        rows = [{"structure": k, "measured_ms": st[k]["median_ms"], "features": features(graph, cost, v, a.block),
                 "widths": cost.widths(v)} for k, v in keeps.items()]
        fits = {name: score(rows, cols) for name, cols in CANDIDATES.items()}
        prof = recipe.profile
        atomic_write_json(a.out, {
            "command": " ".join(["python", "benchmarks/latency_fit.py", *sys.argv[1:]]), "recipe": recipe.name,
            "sets": a.sets, "block": a.block, "calibration": table.model["calibration"], "fits": fits, "rows": rows,
            "environment": environment_report(backend=prof.backend, device=prof.device, threads=prof.threads,
                                              batch_size=prof.batch_size)}, indent=1)
        print("| calibration | fit MAE / max % | leave-one-out MAE / max % |")
        print("|---|---:|---:|")
        for name, f in fits.items():
            print(f"| {name} | {f['fit_mae_pct']:.1f} / {f['fit_max_pct']:.1f} "
                  f"| {f['loo_mae_pct']:.1f} / {f['loo_max_pct']:.1f} |")
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
