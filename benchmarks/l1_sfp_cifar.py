"""L1 filter pruning (Li et al., ICLR 2017) vs soft filter pruning (He et al., IJCAI 2018) at 30, 60
and 90 % of the filters of every layer pruned, on the pretrained CIFAR-10 ResNet-20 of
``../shared/data``, with the unpruned model fine-tuned the same way as reference.

Both papers prune the same fraction P of the filters in every layer.  smcp's ``l1`` and ``sfp``
methods keep the same fraction in every channel group and find it by bisection against a budget, so
each P is given as the ``flops_ratio`` target of exactly that uniform structure (computed on the
model's channel graph, ``target_margin`` 0, channel grid 1): both methods then land on the same widths
and differ only in which filters they keep and how they get there:

* ``l1``: one-shot -- the filters with the smallest L1 norm go before the first step, masks are
  permanent, then every epoch fine-tunes (``ramp_epochs 0``);
* ``sfp``: during the first half of the epochs the lowest-L2 filters are zeroed at the end of every
  epoch but keep training (and may come back); the last selection becomes permanent and the second
  half fine-tunes.

Shortened to fit a 2-core CPU: ``--epochs`` (default 6) epochs of a fixed 10k-image subset of the
JPEG-75 training set, SGD lr 0.005 cosine (the base recipe's), versus 160-200 epochs on the full
training set in the papers; absolute numbers are therefore not comparable to the papers', only the
ordering at equal width.  Each P is one :func:`smcp_core.analysis.compare.compare` (latency of the dense and
both slim models timed interleaved on onnxruntime CPU, batch 1); top-1 on the 10k JPEG-75 test images
and the 1017 exact test images.

    python benchmarks/l1_sfp_cifar.py                  # ~15 min on a quiet 2-core CPU
    python benchmarks/l1_sfp_cifar.py --ratios 0.3 --epochs 2
"""

from __future__ import annotations

import argparse
from pathlib import Path

from _cifar_common import (
    BASE,
    BASE_NAME,
    Log,
    compare_rows,
    eval_sets,
    fmt_top1,
    now,
    publish,
    top1s,
)

from smcp_core import stages
from smcp_core.config.recipe import load_recipe
from smcp_core.prune.allocator import uniform_keep


def uniform_flops_ratio(overrides: list[str], pruned: float) -> float:
    """FLOPs fraction of the structure with ``round((1 - pruned) * width)`` channels kept in every group."""
    r = load_recipe(BASE, overrides)
    model = stages.build_model(r)
    graph = stages.build_graph(r, model)
    full, _ = graph.flops_params()
    kept, _ = graph.flops_params(uniform_keep(graph, 1.0 - pruned))
    return kept / full


def run(ratios: list[float], epochs: int, out: Path, extra: list[str]) -> dict:
    rep = Log()
    shared = Path(load_recipe(BASE, []).data.val_path).parents[1]
    half = epochs // 2
    common = ["model.source=cifar/resnet20", f"model.checkpoint={shared / 'models' / 'resnet20-12fca82f.th'}",
              f"prune.epochs={epochs}", "prune.warmup_epochs=0", f"prune.ramp_epochs={half}",
              f"prune.cooldown_epochs={epochs - half}", "prune.target_margin=0", "prune.channel_round=1",
              "prune.min_channels=1", "prune.layer_pruning=false", *extra]
    per = {"l1": ["prune.ramp_epochs=0", f"prune.cooldown_epochs={epochs}"]}
    sets = eval_sets(common)
    t0 = now()
    pretrained = top1s(stages.build_model(load_recipe(BASE, common)), sets)
    rows, none_row = [], None
    for i, p in enumerate(ratios):
        fr = uniform_flops_ratio(common, p)
        ov = common + [f"prune.target.flops_ratio={fr:.6f}"]
        methods = ["l1", "sfp"] + (["none"] if i == 0 else [])
        rep.log(f"== {p:.0%} of the filters pruned: flops_ratio {fr:.4f}")
        _, rs = compare_rows(ov, methods, out / f"p{int(round(p * 100))}", sets, rep, method_overrides=per,
                             label={"pruned_filters": p, "flops_target": fr})
        for r in rs:
            if r["method"] == "none":
                none_row = r
            else:
                rows.append(r)
    return {"benchmark": "l1_sfp_cifar", "base_recipe": BASE_NAME, "overrides": common, "method_overrides": per,
            "epochs": epochs, "pretrained_top1": pretrained, "none": none_row, "rows": rows,
            "eval_images": {k: n for k, (n, _) in sets.items()}, "seconds": now() - t0}


def widths(row: dict) -> str:
    """``a/b/c, s``: the widest inner width of the blocks of each stage and the residual stream."""
    w = row.get("kept_widths") or []
    if len(w) < 11:  # not the ResNet-20 grouping: print them all
        return "/".join(map(str, w))
    return f"{max(w[2:5])}/{max(w[5:8])}/{max(w[8:11])}, {w[1]}"


def markdown(res: dict) -> str:
    p = res["pretrained_top1"]
    lines = [
        "# L1 vs SFP on the pretrained CIFAR-10 ResNet-20 (shortened schedule)",
        "",
        f"{res['epochs']} epochs of 10k JPEG-75 training images per method (l1 one-shot then fine-tune; sfp soft "
        f"zeroing for {res['epochs'] // 2} epochs then fine-tune). Speed-up measured on onnxruntime CPU at batch 1, "
        f"each ratio's models timed interleaved with the dense model. Top-1: {res['eval_images']['jpeg_test']} JPEG-75 "
        f"test images | {res['eval_images']['exact_test']} exact test images. Pretrained: {fmt_top1(p)}.",
        "",
        "| filters pruned | method | kept widths (stage 1/2/3 blocks, residual stream) | FLOPs | params "
        "| measured speed-up | top-1 JPEG | top-1 exact |",
        "|---:|---|---|---:|---:|---:|---:|---:|",
    ]
    n = res.get("none")
    if n and not n.get("error"):
        lines.append(f"| 0 % | none (fine-tuned) | {widths(n)} | 1.00 | 1.00 | {n['speedup']:.2f}x | "
                     f"{fmt_top1(n['top1'])} |")
    for r in res["rows"]:
        if r.get("error"):
            lines.append(f"| {r['pruned_filters']:.0%} | {r['method']} | failed: {r['error']} | | | | | |")
            continue
        lines.append(f"| {r['pruned_filters']:.0%} | {r['method']} | {widths(r)} | {r['flops_ratio']:.3f} | "
                     f"{r['params_ratio']:.3f} "
                     f"| {r['speedup']:.2f}x | {fmt_top1(r['top1'])} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--ratios", default="0.3,0.6,0.9", help="fractions of the filters pruned in every layer")
    ap.add_argument("--epochs", type=int, default=6)
    ap.add_argument("--out", type=Path, default=Path("runs/bench_l1_sfp"))
    ap.add_argument("--set", dest="sets", action="append", default=[], help="recipe override for every run")
    ap.add_argument("--publish", action="store_true", help="also write benchmarks/results/l1_sfp_cifar.{json,md}")
    a = ap.parse_args()
    res = run([float(x) for x in a.ratios.split(",") if x.strip()], a.epochs, a.out, a.sets)
    publish("l1_sfp_cifar", a.out, res, markdown(res), a.publish)


if __name__ == "__main__":
    main()
