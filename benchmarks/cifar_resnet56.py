"""SMCP on the pretrained CIFAR-10 ResNet-56 at several measured speed-ups, against the unpruned
model fine-tuned the same way, HALP, the smaller network a user could take instead (the pretrained
ResNet-20) and a peer tool (Torch-Pruning, ``benchmarks/peers.py``).

For every target speed-up in ``--targets`` (default 1.5, 2, 3; onnxruntime CPU, batch 1, the recipe
``cifar10_resnet56_2x`` -- or ``--recipe`` -- with ``prune.target.speedup`` replaced) the script runs
:func:`smcp_core.analysis.compare.compare` into ``OUT/<t>x`` with ``--methods`` (default ``smcp,none``;
e.g. ``smcp,halp,none``): every method gets the recipe's budget and its distillation from the dense
model (``none`` -- the unpruned model fine-tuned the same way -- at the first target only;
``--methods-at 1.5=smcp`` gives one target its own list). At the targets in ``--nodistill`` (default none; e.g.
``2``) a second compare into ``OUT/<t>x_nodistill`` runs smcp with ``prune.distill.enabled=false`` on
the same latency table.

Afterwards the dense ResNet-56, the pretrained ResNet-20 (``models/resnet20-12fca82f.th`` next to the
ResNet-56 checkpoint), every slim model and every peer model of ``--peers DIR`` (the
``DIR/<t>x/model.pt`` of a ``peers.py --out DIR`` run) are timed **interleaved in one loop**
(``loop_speedup`` in the results), then each paired with the dense model as the export gate times it
(``paired_speedup`` with its 90 % ``paired_interval``: in the one loop every call starts colder, which
at batch 1 slowed the small models 5-17 % more than the dense one; each compare's own speed-up, also
paired, is kept as ``speedup``), and every model is evaluated on the 10,000 JPEG-75 test images and on
the 1,017 exact-pixel test images.

    python benchmarks/cifar_resnet56.py --targets 2 --methods smcp,halp,none --nodistill 2 --peers runs/peers
    python benchmarks/cifar_resnet56.py --targets 2,1.5 --methods smcp,halp,none --methods-at 1.5=smcp
    python benchmarks/cifar_resnet56.py                       # smcp at 1.5x/2x/3x and none (~4 x 30 min on 2 cores)
    python benchmarks/cifar_resnet56.py --resume              # continue interrupted prunes, re-use finished ones
    python benchmarks/cifar_resnet56.py --set prune.epochs=8  # any recipe override, for every run

A compare directory whose runs are up to date is re-used (nothing is re-trained): re-running only
re-times and re-evaluates; ``--resume`` continues a prune that was interrupted (its
``prune/checkpoint.pt``) instead of starting it over.  Results: ``OUT/NAME.json`` and ``.md`` (OUT
from ``--out``, default ``runs/bench_r56``; NAME from ``--name``, default ``cifar_resnet56``), and
with ``--publish`` a copy in ``benchmarks/results/``.
"""

from __future__ import annotations

import argparse
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from _cifar_common import Log, compare_rows, eval_sets, top1s

from smcp_core import stages
from smcp_core.analysis.compare import copy_table, parse_method_sets, parse_methods
from smcp_core.config.recipe import load_recipe
from smcp_core.errors import SmcpError
from smcp_core.utils.fsutil import atomic_write_json, atomic_write_text, read_json

REPO = Path(__file__).resolve().parents[1]
RECIPE = "cifar10_resnet56_2x"
NO_DISTILL = "smcp (not distilled)"
RESNET20 = "resnet20-12fca82f.th"


def _fmt_target(t: float) -> str:
    return f"{t:g}x"


@dataclass
class BenchRun:
    """What every run of the benchmark shares."""

    recipe: str
    out: Path
    overrides: list[str]
    sets: dict
    rep: Log
    resume: bool
    method_overrides: dict[str, list[str]]


def _compare_rows(b: BenchRun, t: float, cdir: Path, overrides: list[str], methods: list[str],
                  names: dict | None = None) -> list[dict]:
    """One compare at target ``t`` into ``cdir``: a row per method (named by ``names``) with its slim
    model's top-1 and the model itself (under ``model``, dropped before saving); a compare in which
    every method failed gives a row with the error for each, and the benchmark goes on."""
    b.rep.log(f"== target {t}x: {', '.join(methods)} -> {cdir}")
    try:
        _, rows = compare_rows(overrides + [f"prune.target.speedup={t}"], methods, cdir, b.sets, b.rep,
                               {m: v for m, v in b.method_overrides.items() if m in methods},
                               label={"target": t}, recipe=b.recipe, resume=b.resume, keep_model=True)
    except SmcpError as exc:
        b.rep.log(f"target {t}x: {exc}")
        rows = [{"target": t, "method": m, "dir": str(cdir / m), "error": str(exc)} for m in methods]
    for row in rows:
        row["method"] = (names or {}).get(row["method"], row["method"])
    return rows


def _nodistill_rows(b: BenchRun, t: float) -> list[dict]:
    """smcp without distillation at target ``t``, on the latency table of ``OUT/<t>x`` (copied when
    ``OUT/<t>x_nodistill`` has none yet; a table already there is kept, so its runs stay up to date)."""
    cdir = b.out / f"{_fmt_target(t)}_nodistill"
    table = b.out / _fmt_target(t) / "latency.json"
    if table.exists() and not (cdir / "latency.json").exists():
        cdir.mkdir(parents=True, exist_ok=True)
        copy_table(table, cdir)
    return _compare_rows(b, t, cdir, b.overrides + ["prune.distill.enabled=false"], ["smcp"],
                         names={"smcp": NO_DISTILL})


def _reference_models(b: BenchRun, base, peers: Path | None) -> dict[str, torch.nn.Module]:
    """The pretrained ResNet-20 and every peer model of ``peers`` (``<t>x/model.pt``), by row name."""
    ckpt = Path(base.model.checkpoint).parent / RESNET20
    r20 = load_recipe(b.recipe, b.overrides + ["model.source=cifar/resnet20", f"model.checkpoint={ckpt}"])
    models = {"resnet20 (dense, pretrained)": stages.build_model(r20).eval()}
    for path in sorted(peers.glob("*x/model.pt")) if peers else []:
        row = read_json(path.parent / "row.json", "peers target row")
        if row.get("key", {}).get("smoke"):
            b.rep.log(f"{path}: a --smoke model, not timed")
            continue
        models[f"torch-pruning {path.parent.name} ({row.get('status')})"] = torch.load(path, weights_only=False).eval()
    if peers and len(models) == 1:
        raise SmcpError(f"--peers {peers}: no peers.py model (<t>x/model.pt with its row.json) there")
    return models


def _one_loop(base, models: dict[str, torch.nn.Module], out: Path, rep: Log) -> tuple[dict, dict]:
    """Every model (the dense ResNet-56 among them) timed interleaved in one loop, then each paired
    with the dense model as the export gate times it: (one-loop stats, paired stats), by name."""
    rep.log(f"== one interleaved loop: {len(models)} models on {base.export_backend()} "
            f"(batch {base.export_batch_size()})")
    loop = stages.measure_in_one_loop(models, base, out)
    rep.log(f"== each of {len(models) - 1} models paired with the dense model, as the export gate")
    return loop, stages.measure_as_export(models, base, out)


def run(targets: list[float], out: Path, overrides: list[str], methods: list[str] | None = None, *,
        nodistill: list[float] = (), peers: Path | None = None, resume: bool = False, recipe: str = RECIPE,
        method_overrides: dict[str, list[str]] | None = None,
        methods_at: dict[float, list[str]] | None = None) -> dict:
    methods = methods or ["smcp", "none"]
    methods_at = methods_at or {}
    b = BenchRun(recipe, out, overrides, eval_sets(overrides, recipe), Log(), resume, method_overrides or {})
    base, sets = load_recipe(recipe, overrides), b.sets
    t_all = time.perf_counter()
    dense = stages.build_model(base)
    dense_top1 = top1s(dense, sets)
    rows: list[dict] = []
    for i, t in enumerate(targets):
        at = methods_at.get(t, methods)
        todo = [m for m in at if m != "none"] + (["none"] if i == 0 and "none" in at else [])
        if todo:
            rows += _compare_rows(b, t, out / _fmt_target(t), overrides, todo)
        if t in nodistill:
            rows += _nodistill_rows(b, t)
    refs = _reference_models(b, base, peers)
    trained = {f"{r['target']:g}x {r['method']}": r.pop("model") for r in rows if "model" in r}
    stats, paired = _one_loop(base, {"dense": dense, **trained, **refs}, out, b.rep)
    dense_ms = stats["dense"]["median_ms"]

    def timing(key: str) -> dict:
        return {"loop_ms": stats[key]["median_ms"], "loop_speedup": dense_ms / stats[key]["median_ms"],
                "paired_speedup": paired[key]["speedup"], "paired_interval": paired[key]["speedup_interval"]}

    for r in rows:
        key = f"{r['target']:g}x {r['method']}"
        if key in stats:
            r.update(timing(key))
    references = [{"method": k, **timing(k), "top1": top1s(m, sets)} for k, m in refs.items()]
    none_row = next((r for r in rows if r["method"] == "none"), None)
    rows = [r for r in rows if r["method"] != "none"]
    for row in rows:
        if none_row and none_row.get("top1") and row.get("top1"):
            row["drop_vs_none"] = {k: none_row["top1"][k] - row["top1"][k] for k in none_row["top1"]}
    return {
        "recipe": recipe, "overrides": overrides, "method_overrides": b.method_overrides, "targets": targets,
        "methods": methods, "methods_at": {f"{t:g}": m for t, m in methods_at.items()},
        "nodistill_targets": list(nodistill), "peers": str(peers) if peers else None,
        "backend": base.export_backend(), "batch_size": base.export_batch_size(),
        "eval_images": {k: n for k, (n, _) in sets.items()}, "pretrained_top1": dense_top1,
        "loop": {"dense_ms": dense_ms, "stats": stats}, "paired": paired, "none": none_row, "rows": rows,
        "references": references, "seconds": time.perf_counter() - t_all,
    }


def _pct(top1: dict | None, key: str) -> str:
    return f"{top1[key]:.2f}%" if top1 else "n/a"


def _paired(r: dict) -> str:
    """The paired speed-up with its 90 % interval (n/a in results written before it was measured)."""
    if "paired_speedup" not in r:
        return "n/a"
    lo, hi = r["paired_interval"]
    return f"{r['paired_speedup']:.2f}x [{lo:.2f}-{hi:.2f}]"


def _row_line(r: dict) -> str:
    if r.get("error"):
        return f"| {r['target']:g}x | {r['method']} | failed: {r['error']} | | | | | | | | |"
    d = r.get("drop_vs_none")
    dd = f"{d['jpeg_test']:+.2f} / {d['exact_test']:+.2f}" if d else "n/a"
    loop = f"**{r['loop_speedup']:.2f}x**" if "loop_speedup" in r else "n/a"
    return (f"| {r['target']:g}x | {r['method']} | {loop} | {_paired(r)} | {r['speedup']:.2f}x "
            f"| {r.get('loop_ms', float('nan')):.3f} "
            f"| {r['flops_ratio']:.2f} | {r['params_ratio']:.2f} | {_pct(r['top1'], 'jpeg_test')} "
            f"| {_pct(r['top1'], 'exact_test')} | {dd} |")


def markdown(res: dict) -> str:
    p = res["pretrained_top1"]
    lines = [
        "# Pretrained CIFAR-10 ResNet-56: SMCP against the unpruned model fine-tuned the same way, other methods, "
        "a peer tool and the smaller ResNet-20",
        "",
        f"Recipe `{res['recipe']}` {' '.join('--set ' + o for o in res['overrides'])}; latency measured on "
        f"{res['backend']} (batch {res['batch_size']}): every model timed in ONE interleaved loop with the dense "
        f"ResNet-56 ({res['loop']['dense_ms']:.3f} ms), then each paired with the dense model as the export gate "
        "times it (median of per-round ratios, 90 % interval; in the one loop every call starts colder, which slows "
        "the small models more); the speed-up of each compare beside it. Top-1 on "
        f"the {res['eval_images']['jpeg_test']} JPEG-75 test images / the {res['eval_images']['exact_test']} exact "
        f"test images. Pretrained ResNet-56, not fine-tuned: {p['jpeg_test']:.2f}% / {p['exact_test']:.2f}%.",
        "",
        "| target | method | speed-up (one loop) | speed-up (paired, as the gate) | speed-up (its compare) "
        "| latency ms (one loop) | FLOPs | params | top-1 JPEG test | top-1 exact "
        "| drop vs fine-tuned unpruned (JPEG / exact) |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    n = res.get("none")
    if n and n.get("error"):
        lines.append(f"| - | none (unpruned, fine-tuned) | failed: {n['error']} | | | | | | | | |")
    elif n:
        lines.append(f"| - | none (unpruned, fine-tuned) | {n.get('loop_speedup', float('nan')):.2f}x | {_paired(n)} | "
                     f"{n['speedup']:.2f}x | {n.get('loop_ms', float('nan')):.3f} | 1.00 | 1.00 "
                     f"| {_pct(n['top1'], 'jpeg_test')} | {_pct(n['top1'], 'exact_test')} | - |")
    lines += [_row_line(r) for r in res["rows"]]
    for ref in res["references"]:
        lines.append(f"| - | {ref['method']} | **{ref['loop_speedup']:.2f}x** | {_paired(ref)} | - "
                     f"| {ref['loop_ms']:.3f} | | "
                     f"| {_pct(ref['top1'], 'jpeg_test')} | {_pct(ref['top1'], 'exact_test')} | - |")
    return "\n".join(lines) + "\n"


def _floats(spec: str, flag: str) -> list[float]:
    try:
        return [float(x) for x in spec.split(",") if x.strip()]
    except ValueError:
        raise SmcpError(f"{flag} {spec!r}: expected comma-separated numbers such as 1.5,2") from None


def _methods_at(specs: list[str], targets: list[float]) -> dict[float, list[str]]:
    """``["1.5=smcp"]`` -> ``{1.5: ["smcp"]}``; a malformed spec, a target not in ``--targets`` or
    given twice, an unknown method, or ``none`` at any target but the first is a one-line error."""
    out: dict[float, list[str]] = {}
    for spec in specs:
        t, sep, ms = spec.partition("=")
        try:
            target = float(t)
        except ValueError:
            target = None
        if not sep or target is None or target not in targets:
            raise SmcpError(f"--methods-at {spec!r}: expected T=METHOD[,METHOD] with T one of --targets "
                            f"({', '.join(f'{x:g}' for x in targets)}), e.g. 1.5=smcp")
        if target in out:
            raise SmcpError(f"--methods-at {spec!r}: target {target:g} given twice; give it once")
        out[target] = parse_methods(ms, flag=f"--methods-at {spec!r}")
        if "none" in out[target] and target != targets[0]:
            raise SmcpError(f"--methods-at {spec!r}: none (the unpruned model) runs once, at the first target "
                            f"({targets[0]:g}); give it there")
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--targets", default="1.5,2,3", help="comma-separated speed-up targets")
    ap.add_argument("--recipe", default=RECIPE, help="base recipe (the tables before issue 20's re-tune: "
                    "benchmarks/recipes/cifar10_resnet56_short.yaml)")
    ap.add_argument("--methods", default="smcp,none",
                    help="comma-separated methods per target (none: first target only), e.g. smcp,halp,none")
    ap.add_argument("--methods-at", dest="methods_at", action="append", default=[],
                    help="T=METHOD[,METHOD]: target T runs these methods instead of --methods, e.g. 1.5=smcp")
    ap.add_argument("--nodistill", default="", help="targets (among --targets) that also get smcp without "
                    "distillation, e.g. 2")
    ap.add_argument("--peers", type=Path, default=None, help="a peers.py --out folder: time and evaluate its models")
    ap.add_argument("--resume", action="store_true", help="continue interrupted prunes from their checkpoints")
    ap.add_argument("--out", type=Path, default=Path("runs/bench_r56"))
    ap.add_argument("--set", dest="sets", action="append", default=[], help="recipe override for every run")
    ap.add_argument("--set-for", dest="set_for", action="append", default=[],
                    help="METHOD[,METHOD]:KEY=VALUE, an override for some methods only (as smcp compare)")
    ap.add_argument("--name", default="cifar_resnet56", help="results file name (NAME.json, NAME.md)")
    ap.add_argument("--publish", action="store_true", help="also write benchmarks/results/NAME.{json,md}")
    a = ap.parse_args()
    try:
        targets = _floats(a.targets, "--targets")
        methods = parse_methods(a.methods)
        methods_at = _methods_at(a.methods_at, targets)
        every = list(dict.fromkeys(methods + [m for ms in methods_at.values() for m in ms]))
        res = run(targets, a.out, a.sets, methods, nodistill=_floats(a.nodistill, "--nodistill"), peers=a.peers,
                  resume=a.resume, recipe=a.recipe, method_overrides=parse_method_sets(a.set_for, every),
                  methods_at=methods_at)
    except SmcpError as exc:
        sys.exit(f"cifar_resnet56.py: {exc}")
    md = markdown(res)
    a.out.mkdir(parents=True, exist_ok=True)
    dests = [a.out] + ([REPO / "benchmarks" / "results"] if a.publish else [])
    for d in dests:
        atomic_write_json(d / f"{a.name}.json", res)
        atomic_write_text(d / f"{a.name}.md", md)
    print(md)


if __name__ == "__main__":
    main()
