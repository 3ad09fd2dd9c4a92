"""Shared pieces of the CIFAR-10 reproduction scripts (``cifar_resnet18.py``, ``l1_sfp_cifar.py``,
``efficientnet_cifar.py``): every run goes through the same code a user runs (recipes with
overrides, :func:`smcp_core.stages.pruning.prune`, :func:`smcp_core.analysis.compare.compare`), and every model
is evaluated on the two CIFAR-10 test sets of ``../shared/data``.

The base recipe is ``benchmarks/recipes/cifar10_resnet56_short.yaml``: the built-in
``cifar10_resnet56_2x`` as these tables were published with, before issue 20 re-tuned it (CIFAR-10
JPEG-75 training images, a fixed 10k subset per epoch, 16 epochs at lr 0.005, no distillation, batch
128, augmentation, onnxruntime CPU at batch 1 for latency); each script
replaces the model and the schedule with ``--set``-style overrides, which are recorded in its
results.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from smcp_core import stages  # noqa: E402
from smcp_core.analysis.compare import compare  # noqa: E402
from smcp_core.config.recipe import load_recipe  # noqa: E402
from smcp_core.data import make_loader  # noqa: E402
from smcp_core.events import Reporter  # noqa: E402
from smcp_core.prune.trainer import evaluate  # noqa: E402
from smcp_core.utils.fsutil import atomic_write_json, atomic_write_text  # noqa: E402

BASE_NAME = "benchmarks/recipes/cifar10_resnet56_short.yaml"
BASE = str(REPO / BASE_NAME)


class Log(Reporter):
    def log(self, msg: str) -> None:
        print(msg, file=sys.stderr, flush=True)


def eval_sets(overrides: list[str], recipe: str = BASE) -> dict:
    """name -> (images, loader) for the 10k JPEG-75 test images and the 1017 exact test images
    (``recipe`` with ``overrides`` says where the data is)."""
    r0 = load_recipe(recipe, overrides)
    shared = Path(r0.data.val_path).parent
    sets = {}
    for name, path in (("jpeg_test", shared / "cifar10_jpeg.npz"), ("exact_test", shared / "cifar10_exact_subset.npz")):
        r = load_recipe(recipe, overrides + [f"data.val_path={path}", "data.val_subset=null"])
        bundle = stages.build_data(r)
        sets[name] = (len(bundle.val), make_loader(bundle.val, batch_size=256, shuffle=False, seed=0))
    return sets


def top1s(model: torch.nn.Module, sets: dict) -> dict:
    with torch.no_grad():
        return {name: evaluate(model.eval(), loader, torch.device("cpu")) for name, (_, loader) in sets.items()}


def train_dense(overrides: list[str], out: Path, rep: Reporter) -> tuple[Path, dict]:
    """Train (or re-use) the unpruned model with ``prune.method=none``; returns its checkpoint
    (``OUT/prune/pruned.pt``, loadable as ``model.checkpoint``) and the prune summary."""
    # method none prunes nothing whatever the target; a FLOPs target needs no latency table
    r = load_recipe(BASE, overrides + ["prune.method=none", "prune.target.flops_ratio=0.999"])
    out.mkdir(parents=True, exist_ok=True)
    if stages.up_to_date(r, out, "prune"):
        rep.log(f"dense: {out} up to date, re-used")
        from smcp_core.utils.fsutil import read_json

        summary = read_json(out / "prune" / "summary.json", "prune summary")
    else:
        rep.log(f"dense: training -> {out}")
        stages.write_resolved(r, out)
        # an interrupted run continues from its last epoch
        summary = stages.prune(r, out, reporter=rep, resume=(out / "prune" / "checkpoint.pt").exists()).to_dict()
    return out / "prune" / "pruned.pt", summary


def compare_rows(overrides: list[str], methods: list[str], cdir: Path, sets: dict, rep: Reporter,
                 method_overrides: dict[str, list[str]] | None = None,
                 label: dict | None = None, *, recipe: str = BASE, resume: bool = False,
                 keep_model: bool = False) -> tuple[dict, list[dict]]:
    """:func:`compare` of ``recipe`` + top-1 of every slim model on both test sets; returns (compare
    result, rows); ``keep_model`` keeps each slim model in its row (under ``model``)."""
    mo = method_overrides or {}
    res = compare(recipe, overrides, methods, cdir, reporter=rep, method_overrides=mo, resume=resume)
    rows = []
    for r in res["rows"]:
        row = {**(label or {}), "method": r["method"], "dir": r["dir"], "error": r.get("error"),
               "overrides": r.get("overrides")}
        if not r.get("error"):
            rr = load_recipe(recipe, overrides + [f"prune.method={r['method']}"] + list(mo.get(r["method"], [])))
            model = stages.load_slim(rr, Path(r["dir"]))
            row.update({
                "speedup": r["speedup"], "latency_ms": r["latency_ms"], "dense_ms": res["dense"]["latency_ms"],
                "predicted_ms": r.get("predicted_ms"), "flops_ratio": r["flops_ratio"],
                "params_ratio": r["params_ratio"], "train_seconds": r.get("train_seconds"),
                "kept_widths": r.get("kept_widths"), "top1": top1s(model, sets),
            })
            if keep_model:
                row["model"] = model
        rows.append(row)
    return res, rows


def publish(name: str, out: Path, result: dict, md: str, to_repo: bool) -> None:
    """``OUT/<name>.json`` and ``.md``; with ``to_repo`` also under ``benchmarks/results/``."""
    out.mkdir(parents=True, exist_ok=True)
    for d in [out] + ([REPO / "benchmarks" / "results"] if to_repo else []):
        atomic_write_json(d / f"{name}.json", result)
        atomic_write_text(d / f"{name}.md", md)
    print(md)


def fmt_top1(t: dict | None) -> str:
    return f"{t['jpeg_test']:.2f}% | {t['exact_test']:.2f}%" if t else "n/a | n/a"


def now() -> float:
    return time.perf_counter()


def from_scratch_then_prune(model: list[str], dense: list[str], prune: list[str], targets: list[float],
                            methods: list[str], out: Path, extra: list[str],
                            ablations: dict[str, list[str]] | None = None,
                            method_overrides: dict[str, list[str]] | None = None) -> dict:
    """Train ``model`` from scratch (``dense`` overrides, method ``none``) into ``OUT/dense``, then for
    every FLOPs target run ``methods`` (plus ``none``, the dense model fine-tuned with the same
    ``prune`` schedule, at the first target) from that checkpoint into ``OUT/f<target>``; every
    ablation (name -> overrides, smcp only, at the middle target) into ``OUT/<name>``."""
    rep = Log()
    t0 = now()
    common = model + list(extra)
    ckpt, dsum = train_dense(common + dense, out / "dense", rep)
    sets = eval_sets(common)
    r_dense = load_recipe(BASE, common + [f"model.checkpoint={ckpt}"])
    dense_top1 = top1s(stages.build_model(r_dense), sets)
    base = common + prune + [f"model.checkpoint={ckpt}"]
    rows, none_row = [], None
    for i, t in enumerate(targets):
        ms = list(methods) + (["none"] if i == 0 else [])
        rep.log(f"== flops_ratio {t:g}: {', '.join(ms)}")
        _, rs = compare_rows(base + [f"prune.target.flops_ratio={t}"], ms, out / f"f{t:g}", sets, rep,
                             method_overrides=method_overrides, label={"flops_target": t, "variant": "recipe"})
        for r in rs:
            if r["method"] == "none":
                none_row = r
            else:
                rows.append(r)
    mid = targets[len(targets) // 2]
    for name, ov in (ablations or {}).items():
        rep.log(f"== ablation {name}: smcp at flops_ratio {mid:g} with {' '.join(ov)}")
        _, rs = compare_rows(base + [f"prune.target.flops_ratio={mid}"] + list(ov), ["smcp"], out / name, sets, rep,
                             label={"flops_target": mid, "variant": name, "variant_overrides": list(ov)})
        rows += rs
    ref = none_row["top1"] if none_row and none_row.get("top1") else None
    for row in rows:
        if ref and row.get("top1"):
            row["drop_vs_none"] = {k: ref[k] - row["top1"][k] for k in ref}
    return {"base_recipe": BASE_NAME, "model_overrides": common, "dense_overrides": dense, "prune_overrides": prune,
            "dense_train_seconds": dsum.get("seconds"), "dense_top1": dense_top1, "none": none_row, "rows": rows,
            "eval_images": {k: n for k, (n, _) in sets.items()}, "seconds": now() - t0}


def targets_markdown(title: str, intro: str, res: dict) -> str:
    lines = [f"# {title}", "", intro, "",
             f"Top-1: {res['eval_images']['jpeg_test']} JPEG-75 test images | {res['eval_images']['exact_test']} exact "
             f"test images. Dense model after training from scratch: {fmt_top1(res['dense_top1'])}.", "",
             "| FLOPs target | method | variant | FLOPs | params | measured speed-up | top-1 JPEG | top-1 exact "
             "| drop vs fine-tuned unpruned (JPEG / exact) |",
             "|---:|---|---|---:|---:|---:|---:|---:|---:|"]
    n = res.get("none")
    if n and not n.get("error"):
        lines.append(f"| - | none (fine-tuned) | same schedule | 1.00 | 1.00 | {n['speedup']:.2f}x | "
                     f"{fmt_top1(n['top1'])} | - |")
    for r in res["rows"]:
        if r.get("error"):
            lines.append(f"| {r['flops_target']:g} | {r['method']} | {r['variant']} | failed: {r['error']} | | | | | |")
            continue
        d = r.get("drop_vs_none")
        dd = f"{d['jpeg_test']:+.2f} / {d['exact_test']:+.2f}" if d else "n/a"
        lines.append(f"| {r['flops_target']:g} | {r['method']} | {r['variant']} | {r['flops_ratio']:.3f} | "
                     f"{r['params_ratio']:.3f} | {r['speedup']:.2f}x | {fmt_top1(r['top1'])} | {dd} |")
    return "\n".join(lines) + "\n"


def scratch_args(name: str, doc: str, targets: str, out: str):
    """The command line shared by the from-scratch scripts (``name`` is the results file stem)."""
    import argparse

    ap = argparse.ArgumentParser(description=doc.split("\n\n")[0])
    ap.add_argument("--targets", default=targets, help="kept FLOPs fractions")
    ap.add_argument("--dense-epochs", type=int, default=10)
    ap.add_argument("--epochs", type=int, default=6, help="fine-tune epochs of every pruned run (>= 3)")
    ap.add_argument("--out", type=Path, default=Path(out))
    ap.add_argument("--set", dest="sets", action="append", default=[], help="recipe override for every run")
    ap.add_argument("--publish", action="store_true", help=f"also write benchmarks/results/{name}.{{json,md}}")
    a = ap.parse_args()
    a.target_list = [float(x) for x in a.targets.split(",") if x.strip()]
    return a


def scratch_schedules(dense_epochs: int, dense_lr: float, dense_wd: float, epochs: int) -> tuple[list, list, int]:
    """(dense overrides, prune overrides, ramp epochs): dense training without any pruning window,
    then ``epochs`` of fine-tuning as 1 warm-up epoch, the ramp, the rest frozen (lr 0.01, margin 0)."""
    ramp = max(1, (epochs - 1) // 2)
    dense = [f"prune.epochs={dense_epochs}", "prune.warmup_epochs=0", "prune.ramp_epochs=0",
             f"prune.cooldown_epochs={dense_epochs}", f"prune.optimizer.lr={dense_lr}",
             f"prune.optimizer.weight_decay={dense_wd}"]
    prune = [f"prune.epochs={epochs}", "prune.warmup_epochs=1", f"prune.ramp_epochs={ramp}",
             f"prune.cooldown_epochs={epochs - 1 - ramp}", "prune.optimizer.lr=0.01", "prune.target_margin=0"]
    return dense, prune, ramp
