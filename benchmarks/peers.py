"""Peer column of the ResNet-56 accuracy benchmark: Torch-Pruning (``torch-pruning`` on PyPI, imported
as ``torch_pruning``) pruned to a MEASURED speed-up, then fine-tuned with the smcp recipe's budget.

What it measures, for every target speed-up in ``--targets`` (default 2) on the pretrained CIFAR-10
ResNet-56 of the recipe ``cifar10_resnet56_2x`` (weights from ``${SMCP_SHARED_DATA:-../shared/data}``):

1. Torch-Pruning's own pruner (``tp.pruner.BasePruner``, of which ``MetaPruner`` is the alias),
   ``global_pruning=True``, ``round_to=16``, importance ``--importance l1``
   (``tp.importance.MagnitudeImportance(p=1)``) or ``taylor`` (``tp.importance.TaylorImportance()``
   on the gradients of the cross-entropy summed over ``--taylor-batches`` training batches, taken in
   eval mode so that the batch-norm statistics stay as they are), one-shot, at a global
   ``pruning_ratio``.
2. The ratio: a structural scan of the grid 0.05 ... 0.95 (no timing) gives ``r_max``, the grid ratio
   with the fewest MACs; then the ratio is bisected in [0, r_max] (``--bisect-steps`` measurements,
   ``r_max`` first) on the speed-up MEASURED by the repo's paired timing
   (:func:`smcp_core.stages.measure.measure_pair`: dense and pruned model on onnxruntime CPU at batch
   1 in alternating rounds, the export gate's rule: median of the per-round ratios, decided by its
   90 % interval, by the median while it straddles).  The smallest ratio that meets the target wins.
   When ``r_max`` misses it the target is ``unreachable`` (``reachable: false`` in the results) and
   the fastest structure Torch-Pruning reaches (``r_max``) is fine-tuned and reported instead.
3. Fine-tuning in a training loop of our own with the SAME budget as the smcp recipe (after the
   ``--set`` overrides): ``prune.epochs``, ``data.batch_size``, ``data.train_subset`` (null in the
   shipped recipe: all 50k images), ``data.augment``, SGD with ``prune.optimizer`` lr / momentum / weight decay (none on
   1-d parameters, as smcp's trainer) / nesterov, ``prune.lr_schedule`` per step, ``prune.max_steps``,
   ``prune.label_smoothing``, and distillation from the dense pretrained model exactly when the
   recipe distills (``prune.distill.enabled``, ``.alpha``, ``.temperature``) through the public API
   :class:`smcp_core.api.Teacher` / :func:`smcp_core.api.distillation_loss`.  The shipped recipe
   distills; ``--set prune.distill.enabled=false`` turns it off (as for the smcp run).
4. Top-1 on the 10,000 JPEG-75 test images and the 1,017 exact test images (``_cifar_common``),
   pretrained, right after pruning and after fine-tuning; the final speed-up re-measured with the
   export settings (``export.min_runs`` / ``export.max_seconds``); MACs and parameter ratios.

The residual stream is kept.  Observed with torch-pruning 1.6.1 (its ``__version__`` says 1.6.0) on this model (the test
``tests/benchmarks/test_peers_smoke.py`` checks it): its dependency graph takes the option-A
shortcut's channel zero-pad (``F.pad``, ``_ElementWiseOp(ConstantPadNdBackward0)``) for an element-wise
op, so the stem conv, every block's conv2/bn2 in all three stages and the linear's inputs form ONE
group (148 dependencies) that prunes the same channel indices in the 16-, 32- and 64-channel streams
(ignoring the pad's offset) and maps 2 stem channels to 8 linear inputs through the flatten.  Pruning
that group completes without an error, but the model no longer runs: with ``round_to=8`` and ratio 0.3
(or ratio 0.3/0.6 without ``round_to``) its forward raises ``RuntimeError: mat1 and mat2 shapes cannot
be multiplied (1x56 and 32x10)``.  With ``round_to=16`` the group's root (the 16-wide stem) could only go
to 0 channels, which Torch-Pruning's over-pruning check refuses, so the stream stays whole by accident.
This script ignores the stem conv, every block's conv2 and the linear explicitly, so only the
block-inner channels (conv1 out / bn1 / conv2 in) are pruned, whatever ``round_to``.

Also observed: ``round_to`` rounds every layer's kept count DOWN to a multiple of 16 and a layer left
with fewer than 16 channels above the global threshold is refused and stays whole, so the structure
is not monotone in the ratio (L1: the fewest MACs, ~0.70 of the dense model, near 0.35; wide
stage-3 layers come back above it; at 0.9-0.95 nothing is pruned) -- hence the scan before the
bisection.  Stage-1 inner convs are 16 wide and cannot shrink at all.

    python benchmarks/peers.py                                   # target 2x, L1 importance
    python benchmarks/peers.py --targets 1.5,2 --importance taylor
    python benchmarks/peers.py --set prune.distill.enabled=false  # any recipe override (same as the smcp run)
    python benchmarks/peers.py --smoke --out /tmp/peers_smoke     # 1 bisection step, 2 training batches,
                                                                  # minimal timing, 1 eval batch per set
    python benchmarks/peers.py --resume                          # re-use OUT/<t>x/row.json + model.pt

Results: ``OUT/peers.json`` (OUT from ``--out``, default ``runs/peers``), with ``--publish`` a copy in
``benchmarks/results/peers_resnet56.json`` (refused with ``--smoke``).  The pruned, fine-tuned model of
target ``t`` is ``OUT/<t>x/model.pt`` (``torch.save`` of the whole module; load it with
``torch.load(path, weights_only=False)`` with ``smcp_core`` importable), for timing in
``cifar_resnet56.py``'s interleaved loop.  Without torch-pruning the script prints one line and exits 3.
Torch-Pruning is a dependency of this benchmark only; nothing else in the repository imports it.
"""

from __future__ import annotations

import argparse
import copy
import itertools
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

try:
    import torch_pruning as tp
except ImportError:  # the script says so in main()
    tp = None

from _cifar_common import REPO, Log, eval_sets, top1s

from smcp_core import stages
from smcp_core.analysis.model_stats import flop_counter_macs
from smcp_core.api import Teacher, distillation_loss
from smcp_core.config.recipe import load_recipe
from smcp_core.data import make_loader
from smcp_core.prune.trainer import lr_at, sgd_for
from smcp_core.slim.surgery import count_params
from smcp_core.stages.measure import measure_pair
from smcp_core.utils.fsutil import atomic_write_json, read_json

RECIPE = "cifar10_resnet56_2x"
ROUND_TO = 16
SCAN = [i / 20 for i in range(1, 20)]  # 0.05 ... 0.95
MISSING = 'peers.py needs torch-pruning: pip install -e ".[peers]" (or pip install torch-pruning)'
PUBLISHED = REPO / "benchmarks" / "results" / "peers_resnet56.json"
STREAM_NOTE = ("ignored_layers = stem conv1, every block's conv2, linear: the residual stream is kept whole and "
               "only block-inner channels (conv1 out / bn1 / conv2 in) are pruned; torch-pruning 1.6.0 groups the "
               "option-A zero-pad shortcut as element-wise (one group over all three stages) and the pruned model "
               "fails: 'mat1 and mat2 shapes cannot be multiplied (1x56 and 32x10)'")


# ---------------------------------------------------------------- pruning with Torch-Pruning
def blocks(model: torch.nn.Module) -> list[torch.nn.Module]:
    return [b for stage in (model.layer1, model.layer2, model.layer3) for b in stage]


def stream_layers(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The layers whose output channels are (or read) the residual stream: stem conv, every conv2, linear."""
    return [model.conv1, *(b.conv2 for b in blocks(model)), model.linear]


def stream_names(model: torch.nn.Module) -> list[str]:
    names = {m: n for n, m in model.named_modules()}
    return [names[m] for m in stream_layers(model)]


def inner_widths(model: torch.nn.Module) -> list[int]:
    return [b.conv1.out_channels for b in blocks(model)]


def importance(kind: str):
    if kind == "l1":
        return tp.importance.MagnitudeImportance(p=1)
    if kind == "taylor":
        return tp.importance.TaylorImportance()
    raise ValueError(f"importance must be l1 or taylor, got {kind!r}")


def taylor_grads(dense: torch.nn.Module, batches) -> dict[str, torch.Tensor]:
    """Gradients of the cross-entropy summed over ``(x, y)`` batches, on a copy of ``dense`` in eval mode."""
    m = copy.deepcopy(dense).eval()
    m.zero_grad(set_to_none=True)
    for x, y in batches:
        F.cross_entropy(m(x), y).backward()
    return {n: p.grad.detach().clone() for n, p in m.named_parameters() if p.grad is not None}


def prune_copy(dense: torch.nn.Module, example: torch.Tensor, ratio: float, kind: str = "l1", *,
               grads: dict | None = None, round_to: int | None = ROUND_TO,
               ignore_stream: bool = True) -> torch.nn.Module:
    """A copy of ``dense`` pruned one-shot by Torch-Pruning's global pruning at ``ratio`` (Taylor: on
    ``grads`` from :func:`taylor_grads`); ``ignore_stream=False`` ignores nothing (the failing case)."""
    m = copy.deepcopy(dense).eval()
    if ratio <= 0:
        return m
    if kind == "taylor":
        if grads is None:
            raise ValueError("taylor importance needs gradients: taylor_grads(dense, batches)")
        for n, p in m.named_parameters():
            p.grad = grads[n].clone() if n in grads else None
    pruner = tp.pruner.BasePruner(m, example, importance=importance(kind), global_pruning=True,
                                  pruning_ratio=ratio, round_to=round_to,
                                  ignored_layers=stream_layers(m) if ignore_stream else [])
    pruner.step()
    m.zero_grad(set_to_none=True)
    return m


def scan(dense, example, kind: str, grads) -> list[dict]:
    """The structure at every grid ratio (no timing): block-inner widths and the MACs ratio."""
    full = flop_counter_macs(dense, example)
    rows = []
    for r in SCAN:
        m = prune_copy(dense, example, r, kind, grads=grads)
        rows.append({"ratio": r, "inner_widths": inner_widths(m), "flops_ratio": flop_counter_macs(m, example) / full})
    return rows


# ---------------------------------------------------------------- measured speed-up and the bisection
def time_pair(dense, pruned, recipe, target: float, *, min_rounds: int, max_seconds: float) -> dict:
    """``dense`` and ``pruned`` timed in paired rounds on the recipe's export backend and batch."""
    with tempfile.TemporaryDirectory(prefix="smcp-peers-") as tmp:
        m = measure_pair(dense.eval(), pruned.eval(), recipe, batch=recipe.export_batch_size(),
                         backend=recipe.export_backend(), workdir=Path(tmp), kind="speedup", target=target,
                         min_rounds=min_rounds, max_seconds=max_seconds)
    a, b = m.timing.stats()
    iv = m.speedup
    return {"speedup": iv.median, "speedup_interval": [iv.lo, iv.hi], "confidence": iv.confidence,
            "rounds": iv.n, "dense_ms": a.median_ms, "latency_ms": b.median_ms,
            "passed": m.verdict.passed, "decided_by": m.verdict.decided_by}


def bisect(ctx, target: float, a, rep: Log) -> tuple[float | None, list[dict]]:
    """The smallest ratio in [0, r_max] whose measured speed-up meets ``target`` (``a.bisect_steps``
    measurements, ``r_max`` first; a structure already timed is not timed again); None when r_max misses."""
    timed: dict[tuple, dict] = {}
    steps: list[dict] = []

    def meets(r: float) -> bool:
        m = prune_copy(ctx.dense, ctx.example, r, a.importance, grads=ctx.grads)
        key = tuple(inner_widths(m))
        if key not in timed:
            timed[key] = time_pair(ctx.dense, m, ctx.recipe, target, **ctx.bisect_timing)
        steps.append({"ratio": r, "inner_widths": list(key), **timed[key]})
        rep.log(f"  ratio {r:.4f}: {timed[key]['speedup']:.3f}x ({'meets' if timed[key]['passed'] else 'misses'} "
                f"{target:g}x), inner widths {list(key)}")
        return timed[key]["passed"]

    if not meets(ctx.r_max):
        return None, steps
    lo, hi = 0.0, ctx.r_max
    for _ in range(a.bisect_steps - 1):
        mid = (lo + hi) / 2
        lo, hi = (lo, mid) if meets(mid) else (mid, hi)
    return hi, steps


# ---------------------------------------------------------------- fine-tuning (our own loop, the public API)
def plan(recipe, n_train: int, smoke: bool) -> tuple[int, int]:
    """(epochs, optimizer steps per epoch) of the recipe; the smoke run: 1 epoch of 2 steps."""
    pc, bs = recipe.prune, recipe.data.batch_size
    if pc.grad_accum != 1:
        raise SystemExit(f"peers.py fine-tunes without gradient accumulation (prune.grad_accum={pc.grad_accum})")
    steps = max(1, n_train // bs)
    steps = min(steps, pc.max_steps) if pc.max_steps else steps
    return (1, min(2, steps)) if smoke else (pc.epochs, steps)


def fine_tune(model, dense, recipe, bundle, smoke: bool, rep: Log) -> dict:
    """Fine-tune ``model`` in place with the recipe's budget; distillation from ``dense`` as the recipe says."""
    pc, bs = recipe.prune, recipe.data.batch_size
    device = torch.device(pc.device)
    torch.manual_seed(recipe.seed)  # augmentation draws from torch's global RNG
    model.to(device).train()
    teacher = Teacher(dense) if pc.distill.enabled else None
    if teacher is not None:
        teacher.model.to(device)
    opt = sgd_for(model, pc)
    epochs, steps = plan(recipe, len(bundle.train), smoke)
    t0 = time.perf_counter()
    for epoch in range(epochs):
        loader = make_loader(bundle.train, batch_size=bs, shuffle=True, seed=recipe.seed + epoch,
                             drop_last=len(bundle.train) >= bs)
        total = 0.0
        for step, (x, y) in enumerate(itertools.islice(loader, steps)):
            for g in opt.param_groups:
                g["lr"] = lr_at(pc, pc.optimizer.lr, epoch + step / steps, epochs)
            x, y = x.to(device), y.to(device)
            out = model(x)
            loss = (distillation_loss(out, teacher(x), y, alpha=pc.distill.alpha, temperature=pc.distill.temperature,
                                      label_smoothing=pc.label_smoothing) if teacher is not None
                    else F.cross_entropy(out, y, label_smoothing=pc.label_smoothing))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            total += float(loss.detach())
        rep.log(f"  fine-tune epoch {epoch + 1}/{epochs}: loss {total / steps:.4f}")
    model.cpu().eval()
    return {"train_seconds": time.perf_counter() - t0, "epochs": epochs, "steps_per_epoch": steps, "batch_size": bs,
            "distill": ({"alpha": pc.distill.alpha, "temperature": pc.distill.temperature}
                        if teacher is not None else None)}


# ---------------------------------------------------------------- one target, the whole run
def run_key(a, target: float, recipe) -> dict:
    """What a saved target row must have been run with to be re-used by ``--resume``: the settings,
    the resolved recipe (its prune stamp: a re-tuned recipe trains again) and the torch-pruning version."""
    return {"target": target, "importance": a.importance, "round_to": ROUND_TO, "overrides": a.sets,
            "smoke": a.smoke, "bisect_steps": a.bisect_steps, "taylor_batches": a.taylor_batches,
            "recipe_stamp": stages.stamp(recipe, "prune"), "torch_pruning": getattr(tp, "__version__", None)}


def resumed(tdir: Path, key: dict) -> dict | None:
    row_path, model_path = tdir / "row.json", tdir / "model.pt"
    if not (row_path.exists() and model_path.exists()):
        return None
    row = read_json(row_path, "peers target row")
    return row if row.get("key") == key else None


def run_target(ctx, target: float, a, rep: Log) -> dict:
    """Bisect, prune, fine-tune, evaluate and re-time one target; saves ``OUT/<t>x/model.pt`` and ``row.json``."""
    tdir, key = a.out / f"{target:g}x", run_key(a, target, ctx.recipe)
    if a.resume and (row := resumed(tdir, key)) is not None:
        rep.log(f"== target {target:g}x: {tdir} re-used (--resume)")
        return row
    rep.log(f"== target {target:g}x: bisection in [0, {ctx.r_max:g}] ({a.importance}, round_to {ROUND_TO})")
    ratio, steps = bisect(ctx, target, a, rep)
    reachable = ratio is not None
    ratio = ratio if reachable else ctx.r_max
    model = prune_copy(ctx.dense, ctx.example, ratio, a.importance, grads=ctx.grads)
    top1_pruned = top1s(model, ctx.sets)
    ft = fine_tune(model, ctx.dense, ctx.recipe, ctx.bundle, a.smoke, rep)
    final = time_pair(ctx.dense, model, ctx.recipe, target, **ctx.final_timing)
    tdir.mkdir(parents=True, exist_ok=True)
    torch.save(model, tdir / "model.pt")
    best = max(s["speedup"] for s in steps)
    status = ("reached" if final["passed"] else "reached in the bisection, missed when re-measured") if reachable \
        else f"unreachable: best measured {best:.2f}x < {target:g}x"
    row = {"key": key, "target": target, "importance": a.importance, "round_to": ROUND_TO, "ratio": ratio,
           "reachable": reachable,
           "status": status,
           "best_measured_speedup": best, **final,
           "flops_ratio": flop_counter_macs(model, ctx.example) / ctx.dense_macs,
           "params_ratio": count_params(model) / ctx.dense_params, "inner_widths": inner_widths(model),
           "top1_pruned_not_fine_tuned": top1_pruned, "top1": top1s(model, ctx.sets), **ft,
           "ignored_layers": {"layers": stream_names(model), "note": STREAM_NOTE},
           "bisection": steps, "model_path": str(tdir / "model.pt")}
    atomic_write_json(tdir / "row.json", row)
    return row


def first_batches(sets: dict, n: int) -> dict:
    """The evaluation sets cut to their first ``n`` batches (the smoke run)."""
    out = {}
    for name, (_, loader) in sets.items():
        batches = list(itertools.islice(loader, n))
        out[name] = (sum(len(y) for _, y in batches), batches)
    return out


def setup(a, rep: Log) -> argparse.Namespace:
    """Recipe, dense model, data, evaluation sets, Taylor gradients, the structural scan and r_max."""
    recipe = load_recipe(RECIPE, a.sets)
    dense = stages.build_model(recipe).eval()
    example = stages.example_input(recipe, 1)
    bundle = stages.build_data(recipe)
    sets = eval_sets(a.sets, RECIPE)
    sets = first_batches(sets, 1) if a.smoke else sets
    grads = None
    if a.importance == "taylor":
        loader = make_loader(bundle.train, batch_size=recipe.data.batch_size, shuffle=True, seed=recipe.seed + 7)
        grads = taylor_grads(dense, itertools.islice(loader, 1 if a.smoke else a.taylor_batches))
    rep.log("structural scan of the pruning ratio (no timing)")
    grid = scan(dense, example, a.importance, grads)
    r_max = min(grid, key=lambda s: (s["flops_ratio"], s["ratio"]))["ratio"]
    fast = {"min_rounds": 3, "max_seconds": 1.0}
    return argparse.Namespace(
        recipe=recipe, dense=dense, example=example, bundle=bundle, sets=sets, grads=grads, scan=grid, r_max=r_max,
        dense_macs=flop_counter_macs(dense, example), dense_params=count_params(dense),
        bisect_timing=fast if a.smoke else {"min_rounds": 30, "max_seconds": a.bisect_seconds},
        final_timing=fast if a.smoke else {"min_rounds": recipe.export.min_runs,
                                           "max_seconds": recipe.export.max_seconds})


def run(a) -> dict:
    rep = Log()
    t0 = time.perf_counter()
    ctx = setup(a, rep)
    pretrained = top1s(ctx.dense, ctx.sets)
    rows = [run_target(ctx, t, a, rep) for t in a.targets]
    return {"peer": "torch-pruning", "torch_pruning_version": getattr(tp, "__version__", None), "recipe": RECIPE,
            "overrides": a.sets, "importance": a.importance, "round_to": ROUND_TO, "smoke": a.smoke,
            "backend": ctx.recipe.export_backend(), "batch_size": ctx.recipe.export_batch_size(),
            "eval_images": {k: n for k, (n, _) in ctx.sets.items()}, "pretrained_top1": pretrained,
            "r_max": ctx.r_max, "scan": ctx.scan, "ignored_layers_note": STREAM_NOTE, "rows": rows,
            "seconds": time.perf_counter() - t0}


def parse(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--targets", default="2", help="comma-separated measured speed-up targets")
    ap.add_argument("--importance", choices=["l1", "taylor"], default="l1")
    ap.add_argument("--set", dest="sets", action="append", default=[], help="recipe override (repeatable)")
    ap.add_argument("--out", type=Path, default=Path("runs/peers"), help="folder of peers.json and <t>x/model.pt")
    ap.add_argument("--bisect-steps", type=int, default=6, help="speed-up measurements per target")
    ap.add_argument("--bisect-seconds", type=float, default=30.0, help="time limit of one bisection measurement")
    ap.add_argument("--taylor-batches", type=int, default=4, help="training batches of the Taylor gradients")
    ap.add_argument("--smoke", action="store_true", help="1 bisection step, 2 training batches, minimal timing")
    ap.add_argument("--resume", action="store_true", help="re-use OUT/<t>x/row.json + model.pt of the same run")
    ap.add_argument("--publish", action="store_true", help=f"also copy peers.json to {PUBLISHED.relative_to(REPO)}")
    a = ap.parse_args(argv)
    a.targets = [float(x) for x in a.targets.split(",") if x.strip()]
    a.bisect_steps = 1 if a.smoke else max(1, a.bisect_steps)
    if a.smoke and a.publish:
        ap.error("--publish with --smoke: smoke numbers are not results")
    return a


def main(argv: list[str] | None = None) -> None:
    if tp is None:
        print(MISSING, file=sys.stderr)
        raise SystemExit(3)
    a = parse(argv)
    res = run(a)
    path = atomic_write_json(a.out / "peers.json", res)
    if a.publish:
        shutil.copyfile(path, PUBLISHED)
    for r in res["rows"]:
        lo, hi = r["speedup_interval"]
        print(f"{r['target']:g}x {r['importance']}: ratio {r['ratio']:.4f}, {r['status']}, "
              f"measured {r['speedup']:.3f}x [{lo:.3f}, {hi:.3f}], MACs {r['flops_ratio']:.3f}, "
              f"top-1 {r['top1']['jpeg_test']:.2f}% / {r['top1']['exact_test']:.2f}%, {r['train_seconds']:.0f} s")
    print(f"results: {path}")


if __name__ == "__main__":
    main()
