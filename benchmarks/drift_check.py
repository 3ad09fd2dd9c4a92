"""Where does the gate's run-to-run spread come from?  The same dense/pruned pair timed in several
fresh processes, several sets of new onnxruntime sessions per process, and twice per set of
sessions, so that the spread of the measured speed-up splits into: between processes, between
session sets of one process, and between two loops of the same sessions (time alone).

    python benchmarks/drift_check.py --processes 6 --session-sets 3 --rounds 200

The pair: ``--recipe`` (default the quickstart)'s model, random weights (latency does not depend on
them), dense and thinned to ``--keep`` of every prunable group on the recipe's channel grid
(:func:`smcp_core.stages.measure.slim_structure`); both exported to ONNX once, in the parent, and
timed as the export gate times them (the recipe's backend, batch and threads, four sessions per
model in turn, paired rounds in alternating order).  Per loop three estimators of the speed-up: the
gate's median of per-round ratios, the ratio of the two medians and the ratio of the two 10th
percentiles.  Written to ``--out`` (default ``benchmarks/results/drift_check.json``): every loop, and
per estimator the spread (max/min - 1) over everything, between process means, between the session
sets of a process (mean over processes) and between the two loops of a session set.  Run it on a
machine doing nothing else.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from smcp_core import stages  # noqa: E402
from smcp_core.config.recipe import load_recipe  # noqa: E402
from smcp_core.export.onnx import export_onnx  # noqa: E402
from smcp_core.profile.fingerprint import environment_report  # noqa: E402
from smcp_core.profile.paired import PairedTiming, time_paired  # noqa: E402
from smcp_core.prune.allocator import uniform_keep  # noqa: E402
from smcp_core.stages.measure import _runners  # noqa: E402  (the gate's own runners, sessions included)
from smcp_core.utils.fsutil import atomic_write_json  # noqa: E402

ESTIMATORS = ("median_of_ratios", "ratio_of_medians", "ratio_of_p10")


def estimates(t: PairedTiming) -> dict[str, float]:
    """The three speed-up estimators of one loop."""
    def q10(xs: list[float]) -> float:
        return statistics.quantiles(xs, n=10)[0]
    return {"median_of_ratios": statistics.median(t.ratios()),
            "ratio_of_medians": statistics.median(t.a_s) / statistics.median(t.b_s),
            "ratio_of_p10": q10(t.a_s) / q10(t.b_s)}


def export_pair(recipe_name: str, keep_frac: float, workdir: Path) -> dict[str, Path]:
    """The dense and thinned model of the recipe as ONNX files in ``workdir``."""
    recipe = load_recipe(recipe_name, [])
    dense = stages.build_model(recipe, load_weights=False).eval()
    graph = stages.build_graph(recipe, dense)
    keep = uniform_keep(graph, keep_frac, recipe.prune.channel_round)
    pruned = stages.slim_structure(recipe, graph, keep).eval()
    x = stages.example_input(recipe, recipe.export_batch_size())
    paths = {}
    for name, m in (("baseline", dense), ("pruned", pruned)):
        paths[name] = workdir / f"{name}.onnx"
        export_onnx(m, x, paths[name], opset=recipe.export.opset)
    return paths


def child(recipe_name: str, workdir: Path, session_sets: int, rounds: int) -> list[dict]:
    """One process: ``session_sets`` sets of new sessions, each timed in two loops."""
    recipe = load_recipe(recipe_name, [])
    onnx = {k: workdir / f"{k}.onnx" for k in ("baseline", "pruned")}
    models = {k: None for k in onnx}  # the ONNX files exist: nothing is exported
    loops = []
    for s in range(session_sets):
        fns, timer, _ = _runners(models, recipe, batch=recipe.export_batch_size(), backend=recipe.export_backend(),
                                 workdir=workdir, onnx_paths=dict(onnx))
        for loop in range(2):
            t = time_paired(fns["baseline"], fns["pruned"], warmup=5, min_rounds=rounds, max_rounds=rounds,
                            max_seconds=600, timer=timer)
            loops.append({"session_set": s, "loop": loop, "rounds": len(t.a_s), "at": time.time(), **estimates(t)})
    return loops


def _spread(xs: list[float]) -> float:
    return max(xs) / min(xs) - 1 if xs else float("nan")


def summary(rows: list[dict]) -> dict[str, dict[str, float]]:
    """Per estimator: the spread over every loop, between process means, between session sets of a
    process (mean over processes) and between the two loops of a session set (mean)."""
    out = {}
    procs = sorted({r["process"] for r in rows})
    by_proc = {p: [r for r in rows if r["process"] == p] for p in procs}
    sets = {(r["process"], r["session_set"]) for r in rows}
    for est in ESTIMATORS:
        set_means = {k: statistics.mean(r[est] for r in rows if (r["process"], r["session_set"]) == k) for k in sets}
        out[est] = {
            "all": _spread([r[est] for r in rows]),
            "between_processes": _spread([statistics.mean(r[est] for r in rs) for rs in by_proc.values()]),
            "between_session_sets": statistics.mean(
                _spread([v for (p, _), v in set_means.items() if p == q]) for q in procs),
            "between_loops": statistics.mean(
                _spread([r[est] for r in rows if (r["process"], r["session_set"]) == k]) for k in sets),
            "mean": statistics.mean(r[est] for r in rows),
        }
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--recipe", default="quickstart")
    ap.add_argument("--keep", type=float, default=0.5, help="fraction of every prunable group kept")
    ap.add_argument("--processes", type=int, default=6)
    ap.add_argument("--session-sets", dest="session_sets", type=int, default=3)
    ap.add_argument("--rounds", type=int, default=200, help="paired rounds per loop")
    ap.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "drift_check.json")
    ap.add_argument("--child", type=Path, default=None, help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.rounds < 10 or a.processes < 1 or a.session_sets < 1:
        ap.error("--rounds must be at least 10, --processes and --session-sets at least 1")
    recipe = load_recipe(a.recipe, [])
    if recipe.export_backend() != "onnxruntime":
        ap.error(f"recipe {a.recipe}: export backend {recipe.export_backend()}; drift_check.py times onnxruntime "
                 "sessions (the backend whose run-to-run spread the gate check found)")
    if a.child:
        print(json.dumps(child(a.recipe, a.child, a.session_sets, a.rounds)))
        return
    with tempfile.TemporaryDirectory(prefix="smcp_drift_") as tmp:
        export_pair(a.recipe, a.keep, Path(tmp))
        rows = []
        for p in range(a.processes):
            proc = subprocess.run([sys.executable, __file__, "--recipe", a.recipe, "--session-sets",
                                   str(a.session_sets), "--rounds", str(a.rounds), "--child", tmp],
                                  capture_output=True, text=True)
            if proc.returncode != 0:
                tail = " | ".join(proc.stderr.strip().splitlines()[-3:])
                sys.exit(f"drift_check.py: process {p + 1} failed (exit {proc.returncode}): {tail}")
            loops = json.loads(proc.stdout.strip().splitlines()[-1])
            rows += [{"process": p, **r} for r in loops]
            print(f"process {p + 1}/{a.processes}: median of ratios "
                  + ", ".join(f"{r['median_of_ratios']:.3f}" for r in loops), flush=True)
    doc = {"command": " ".join(["python", "benchmarks/drift_check.py", *sys.argv[1:]]), "keep": a.keep,
           "rounds": a.rounds, "summary": summary(rows), "rows": rows,
           "environment": environment_report(backend=recipe.export_backend(), device=recipe.profile.device,
                                             threads=recipe.profile.threads, batch_size=recipe.export_batch_size())}
    atomic_write_json(a.out, doc, indent=1)
    for est, s in doc["summary"].items():
        print(f"{est:17s} mean {s['mean']:.3f}x  spread: all {100 * s['all']:.1f} %, between processes "
              f"{100 * s['between_processes']:.1f} %, session sets {100 * s['between_session_sets']:.1f} %, "
              f"loops {100 * s['between_loops']:.1f} %")


if __name__ == "__main__":
    main()
