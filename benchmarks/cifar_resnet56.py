"""SMCP on the pretrained CIFAR-10 ResNet-56 at several measured speed-ups, against the unpruned
model fine-tuned the same way and a uniform width cut.

For every target speed-up in ``--targets`` (default 1.5, 2, 3; onnxruntime CPU, batch 1, the
recipe ``cifar10_resnet56_2x`` with ``prune.target.speedup`` replaced) the script runs
:func:`smcp_core.analysis.compare.compare` into ``OUT/<t>x`` with the methods

* ``smcp``: the recipe as it is (soft masks, Taylor importance, latency knapsack with layer
  pruning, ``target_margin`` 0.1 and ``closed_loop`` 2: the end of the ramp measures the slimmed
  model and re-solves when it misses the target or lands far below the aim);
* ``uniform``: the same kept fraction in every prunable group, found by bisection against the
  table (``target_margin`` 0.05: the table's calibration is accurate for uniform structures);
* ``none`` (first target only): the unpruned model fine-tuned for the same epochs, with the same
  data, optimizer and schedule -- reference (a) of the comparison.

Each compare profiles one latency table, prunes + slims every method, then times the dense model and
every slim model **interleaved in one loop**, so the speed-ups are measured ratios on one backend in
one run.  Afterwards every model (pretrained dense, fine-tuned ``none``, every slim model) is
evaluated on the 10,000 JPEG-75 test images and on the 1,017 exact-pixel test images.

    python benchmarks/cifar_resnet56.py                       # all three targets (~20 min per training run
                                                              # on a 2-core CPU: ~1h40)
    python benchmarks/cifar_resnet56.py --targets 2           # one target (three training runs)
    python benchmarks/cifar_resnet56.py --set prune.epochs=8  # any recipe override, for every run
    python benchmarks/cifar_resnet56.py --methods smcp,none   # leave out the uniform runs

A compare directory whose runs are up to date is re-used (nothing is re-trained): re-running only
re-times and re-evaluates.  Results: ``OUT/NAME.json`` and ``.md`` (OUT from ``--out``, default
``runs/bench_r56``; NAME from ``--name``, default ``cifar_resnet56``), and with ``--publish`` a copy in
``benchmarks/results/``.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from _cifar_common import Log, eval_sets, top1s

from smcp_core import stages
from smcp_core.analysis.compare import compare
from smcp_core.config.recipe import load_recipe
from smcp_core.utils.fsutil import atomic_write_json, atomic_write_text

REPO = Path(__file__).resolve().parents[1]
RECIPE = "cifar10_resnet56_2x"
UNIFORM_SETS = ["prune.target_margin=0.05", "prune.channel_round=4", "prune.min_channels=4"]


def _fmt_target(t: float) -> str:
    return f"{t:g}x"


def run(targets: list[float], out: Path, overrides: list[str], methods: list[str] | None = None) -> dict:
    methods = methods or ["smcp", "uniform", "none"]
    rep = Log()
    base = load_recipe(RECIPE, overrides)
    sets = eval_sets(overrides)
    rows = []
    t_all = time.perf_counter()
    dense_top1 = top1s(stages.build_model(base), sets)
    none_row = None
    for i, t in enumerate(targets):
        todo = [m for m in methods if m != "none"] + (["none"] if i == 0 and "none" in methods else [])
        cdir = out / _fmt_target(t)
        rep.log(f"== target {t}x: {', '.join(todo)} -> {cdir}")
        res = compare(RECIPE, overrides + [f"prune.target.speedup={t}"], todo, cdir, reporter=rep,
                      method_overrides={"uniform": list(UNIFORM_SETS)})
        for r in res["rows"]:
            row = {"target": t, "method": r["method"], "dir": r["dir"], "error": r.get("error")}
            if "error" not in r:
                rr = load_recipe(RECIPE, overrides + [f"prune.target.speedup={t}", f"prune.method={r['method']}"]
                                 + (UNIFORM_SETS if r["method"] == "uniform" else []))
                model = stages.load_slim(rr, Path(r["dir"]))
                row.update({
                    "latency_ms": r["latency_ms"], "dense_ms": res["dense"]["latency_ms"], "speedup": r["speedup"],
                    "predicted_ms": r.get("predicted_ms"), "flops_ratio": r["flops_ratio"],
                    "params_ratio": r["params_ratio"], "train_seconds": r.get("train_seconds"),
                    "top1": top1s(model, sets),
                })
            if r["method"] == "none":
                none_row = row
            else:
                rows.append(row)
    ref = none_row["top1"] if none_row and none_row.get("top1") else None
    for row in rows:
        if ref and row.get("top1"):
            row["drop_vs_none"] = {k: ref[k] - row["top1"][k] for k in ref}
    return {
        "recipe": RECIPE, "overrides": overrides, "targets": targets, "methods": methods,
        "backend": base.export_backend(), "batch_size": base.export_batch_size(),
        "eval_images": {k: n for k, (n, _) in sets.items()},
        "pretrained_top1": dense_top1, "none": none_row, "rows": rows,
        "seconds": time.perf_counter() - t_all,
    }


def markdown(res: dict) -> str:
    p = res["pretrained_top1"]
    lines = [
        "# Pretrained CIFAR-10 ResNet-56: SMCP vs uniform width vs the unpruned model fine-tuned the same way",
        "",
        f"Recipe `{res['recipe']}` {' '.join('--set ' + o for o in res['overrides'])}; latency measured on "
        f"{res['backend']} (batch {res['batch_size']}), every model of a target timed interleaved with the "
        f"dense model in one loop. Top-1 on the {res['eval_images']['jpeg_test']} JPEG-75 test images / the "
        f"{res['eval_images']['exact_test']} exact test images. Pretrained, not fine-tuned: "
        f"{p['jpeg_test']:.2f}% / {p['exact_test']:.2f}%.",
        "",
        "| target | method | measured speed-up | latency ms (dense) | FLOPs | params | top-1 JPEG test | top-1 exact "
        "| drop vs fine-tuned unpruned (JPEG / exact) |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    n = res.get("none")
    if n and n.get("top1"):
        lines.append(f"| - | none (unpruned, fine-tuned) | {n['speedup']:.2f}x | "
                     f"{n['latency_ms']:.3f} ({n['dense_ms']:.3f}) "
                     f"| 1.00 | 1.00 | {n['top1']['jpeg_test']:.2f}% | {n['top1']['exact_test']:.2f}% | - |")
    for r in res["rows"]:
        if r.get("error"):
            lines.append(f"| {r['target']:g}x | {r['method']} | failed: {r['error']} | | | | | | |")
            continue
        d = r.get("drop_vs_none")
        dd = f"{d['jpeg_test']:+.2f} / {d['exact_test']:+.2f}" if d else "n/a"
        lines.append(f"| {r['target']:g}x | {r['method']} | {r['speedup']:.2f}x | "
                     f"{r['latency_ms']:.3f} ({r['dense_ms']:.3f}) "
                     f"| {r['flops_ratio']:.2f} | {r['params_ratio']:.2f} | {r['top1']['jpeg_test']:.2f}% "
                     f"| {r['top1']['exact_test']:.2f}% | {dd} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--targets", default="1.5,2,3", help="comma-separated speed-up targets")
    ap.add_argument("--methods", default="smcp,uniform,none",
                    help="comma-separated methods per target (none: first target only)")
    ap.add_argument("--out", type=Path, default=Path("runs/bench_r56"))
    ap.add_argument("--set", dest="sets", action="append", default=[], help="recipe override for every run")
    ap.add_argument("--name", default="cifar_resnet56", help="results file name (NAME.json, NAME.md)")
    ap.add_argument("--publish", action="store_true", help="also write benchmarks/results/NAME.{json,md}")
    a = ap.parse_args()
    targets = [float(x) for x in a.targets.split(",") if x.strip()]
    methods = [m.strip() for m in a.methods.split(",") if m.strip()]
    res = run(targets, a.out, a.sets, methods)
    md = markdown(res)
    a.out.mkdir(parents=True, exist_ok=True)
    dests = [a.out] + ([REPO / "benchmarks" / "results"] if a.publish else [])
    for d in dests:
        atomic_write_json(d / f"{a.name}.json", res)
        atomic_write_text(d / f"{a.name}.md", md)
    print(md)


if __name__ == "__main__":
    main()
