"""The prune stage: SMCP (or another method) fine-tuning to the recipe's target."""

from __future__ import annotations

import time
from pathlib import Path

import torch

from smcp_core import __version__
from smcp_core.config.presets import UNSTRUCTURED
from smcp_core.config.recipe import Recipe
from smcp_core.data import make_loader
from smcp_core.errors import InfeasibleTarget, SmcpError
from smcp_core.events import Reporter
from smcp_core.graph.channel_graph import ChannelGraph
from smcp_core.profile.cost_model import CostModel
from smcp_core.prune.allocator import Allocator
from smcp_core.prune.methods import unstructured_masks
from smcp_core.prune.trainer import LatencyCheck, TrainResult, prune_train
from smcp_core.prune.unstructured import unstructured_speed_note
from smcp_core.stages.artifacts import stamp, up_to_date
from smcp_core.stages.builders import (
    build_data,
    build_graph,
    build_model,
    load_table,
    target_budget,
)
from smcp_core.stages.measure import keep_measurer
from smcp_core.stages.results import PruneResult
from smcp_core.utils import dist
from smcp_core.utils.fsutil import (
    atomic_torch_save,
    atomic_write_json,
    load_torch,
    remove_artifact,
)


def prune(recipe: Recipe, out: Path, *, reporter: Reporter | None = None, resume: bool = False,
          force_table: bool = False) -> PruneResult:
    """SMCP fine-tuning to the recipe's target.  Under ``torchrun`` every rank calls this; they
    train data-parallel and only rank 0 writes artifacts; with a CUDA ``prune.device`` each rank
    trains on its own GPU, ``cuda:LOCAL_RANK`` (an explicit ``cuda:N`` is mapped there, with one log
    line: :func:`~smcp_core.utils.dist.local_device`).  The result's ``train`` is the in-memory
    :class:`~smcp_core.prune.trainer.TrainResult` (not written to disk)."""
    rep = reporter or Reporter()
    dist.init_from_env(recipe.prune.device)
    pdir = out / "prune"
    pdir.mkdir(parents=True, exist_ok=True)
    model = build_model(recipe)
    graph = build_graph(recipe, model)
    kind = "flops" if recipe.target_kind() == "flops_ratio" else "latency"
    table = load_table(recipe, out, force_table=force_table) if kind == "latency" else None
    cost = CostModel(graph, kind, table)
    budget, tdesc = target_budget(recipe, cost, table)
    pc = recipe.prune
    alloc = Allocator.from_recipe(graph, cost, pc)
    channels = not (pc.method == "none" or pc.method in UNSTRUCTURED)
    if channels:
        check_reachable(alloc, cost, graph, budget, tdesc)
    else:  # the full model is the channel budget: no channel is masked
        budget, tdesc = cost.total(graph.full_keep()), _ignored_target(pc, tdesc)
    bundle = build_data(recipe)
    if not resume and dist.is_main():  # a fresh run, past every input check: the previous run's files go
        for name in ("checkpoint.pt", "metrics.csv", "weight_masks.pt"):
            remove_artifact(pdir / name)
    dist.barrier()
    weight_masks = _weight_masks(recipe, model, bundle, pdir, rep) if pc.method in UNSTRUCTURED else None
    check = None
    if kind == "latency" and pc.closed_loop > 0 and channels:
        check = _latency_check(recipe, graph, table, tdesc, pdir)
    t0 = time.perf_counter()
    res = prune_train(recipe=recipe, model=model, graph=graph, cost=cost, target_cost=budget,
                      train_set=bundle.train, val_set=bundle.val, out_dir=pdir, resume=resume, reporter=rep,
                      make_loader=lambda ds, **kw: make_loader(ds, workers=recipe.data.workers, **kw),
                      weight_masks=weight_masks, latency_check=check, allocator=alloc)
    if dist.is_main():
        atomic_torch_save({"state_dict": res.state_dict,
                           "keep": res.keep.cpu(), "n_classes": graph.n_classes,
                           "smcp_version": __version__}, pdir / "pruned.pt", checksum=True)
    summary = _summary(recipe, graph, cost, table, tdesc, res, seconds=time.perf_counter() - t0)
    if weight_masks is not None:
        summary.unstructured = _unstructured_summary(pc, res, weight_masks)
    if dist.is_main():
        atomic_write_json(pdir / "summary.json", summary.to_dict(), checksum=True)
    dist.barrier()
    return summary


def refuse_to_discard_checkpoint(recipe: Recipe, out: Path) -> None:
    """For ``smcp run`` without ``--resume``/``--force``: a prune that is not up to date would start
    over and delete ``prune/checkpoint.pt`` (an interrupted prune's work); stop instead, with one
    line naming both ways on.  A checkpoint whose run finished (every epoch it was started with
    done: a finished prune that a recipe change made out of date) holds no unfinished work."""
    ck = out / "prune" / "checkpoint.pt"
    if ck.exists() and not up_to_date(recipe, out, "prune") and not _finished(ck):
        raise SmcpError(f"an interrupted prune exists ({ck}); pass --resume to continue it, "
                        "or --force to start over (deletes the checkpoint)")


def _finished(ck: Path) -> bool:
    """Whether the run that wrote the prune checkpoint ``ck`` did all its epochs (an unreadable
    checkpoint counts as unfinished: it is not discarded silently either)."""
    try:
        state = load_torch(ck, "prune checkpoint", keys=("epoch",))
    except SmcpError:
        return False
    epochs = ((state.get("recipe") or {}).get("prune") or {}).get("epochs")
    return isinstance(epochs, int) and int(state["epoch"]) >= epochs


def _ignored_target(pc, tdesc: dict) -> dict:
    """The target description of a method that removes no channel (``none``, unstructured)."""
    note = ("target ignored, nothing pruned" if pc.method == "none" else
            f"unstructured: {pc.sparsity:g} of the conv/linear weights zeroed, no channel removed; "
            "the channel target is ignored")
    return {**tdesc, "method": pc.method, "note": note}


def check_reachable(alloc: Allocator, cost: CostModel, graph: ChannelGraph, budget: float, tdesc: dict, *,
                    relax: str | None = None) -> None:
    """Feasibility up front, with the real solver (importance not known yet: all zero); an
    unreachable target is one line naming the fastest reachable model and what to relax
    (``relax``: the wording of the settings to change, default the recipe keys)."""
    try:
        alloc.solve(torch.zeros(graph.n_classes), budget, graph.full_keep(), rounds=1, inner=2)
        return
    except InfeasibleTarget:
        pass
    lo = alloc.min_cost()
    if cost.kind == "latency":
        pred_lo = cost.calibrated(lo)
        hint = (f"the fastest reachable model is predicted at about {pred_lo:.4g} ms "
                f"({tdesc['baseline_ms'] / pred_lo:.2f}x)")
    else:
        hint = f"minimum {lo:.4g} {cost.unit}"
    relax = relax or (f"{Recipe.relax_hint_for(tdesc['kind'])} or allow smaller widths (prune.min_channels, "
                      "prune.channel_round, prune.layer_pruning)")
    raise InfeasibleTarget(f"target {tdesc['kind']}={tdesc['value']} is out of reach: {hint}; {relax}")


def _latency_check(recipe: Recipe, graph: ChannelGraph, table, tdesc: dict, pdir: Path) -> LatencyCheck:
    """The closed loop's measurer and the calibration points it starts from (``prune.closed_loop``)."""
    cal = (table.model or {}).get("calibration") or {}
    points = [(p["layer_sum_ms"], int(p.get("removed_layers", 0)), p["measured_ms"]) for p in cal.get("points", [])]
    measure = _keep_measurer(recipe, graph, pdir, target_speedup=tdesc["baseline_ms"] / tdesc["target_ms"])
    return LatencyCheck(measure=measure, baseline_ms=float(table.model["measured_ms"]),
                        target_ms=tdesc["target_ms"], aim_ms=tdesc["aim_ms"], points=points,
                        rounds=recipe.prune.closed_loop)


def _summary(recipe: Recipe, graph: ChannelGraph, cost: CostModel, table, tdesc: dict, res: TrainResult, *,
             seconds: float) -> PruneResult:
    """``prune/summary.json``: the target, the predicted cost of the final masks and what they keep."""
    budget = res.target_cost  # the closed loop may have tightened it
    latency = cost.kind == "latency"
    flops_full, params_full = graph.flops_params()
    flops_kept, params_kept = graph.flops_params(res.keep)
    groups = [{"group": g.index, "kept": int(res.keep[g.classes].sum()), "channels": g.size,
               "consumers": [graph.layers[i].name for i in g.consumers]} for g in graph.groups]
    layers = [{"name": layer.name, "kind": layer.kind, "cin": ci, "cout": co, "cin_full": layer.sig.cin,
               "cout_full": layer.sig.cout} for layer, (ci, co) in zip(graph.layers, graph.widths(res.keep))]
    return PruneResult(
        stamp=stamp(recipe, "prune"),
        target=tdesc,
        budget=budget,
        cost_unit=cost.unit,
        full_cost=res.full_cost,
        final_cost=res.final_cost,
        meets_budget=res.final_cost <= budget * (1 + 1e-9),
        predicted_ms=cost.predict(res.keep) if latency else None,
        predicted_speedup=(float(table.model["measured_ms"]) / cost.predict(res.keep)) if latency else None,
        flops_ratio=flops_kept / flops_full,
        params_ratio=params_kept / params_full,
        top1=res.final_top1,
        seconds=seconds,
        groups=groups,
        layers=layers,
        history=res.history,
        world_size=dist.world(),
        train=res,
    )


def _unstructured_summary(pc, res: TrainResult, weight_masks: dict) -> dict:
    zeros = sum(int((res.state_dict[f"{n}.weight"] == 0).sum()) for n in weight_masks)
    total = sum(int(m.numel()) for m in weight_masks.values())
    return {"method": pc.method, "sparsity_target": pc.sparsity, "sparsity": zeros / total, "weights": total,
            "layers": len(weight_masks), "note": unstructured_speed_note(zeros / total)}


def _keep_measurer(recipe: Recipe, graph: ChannelGraph, workdir: Path, *, target_speedup: float):
    """The closed loop's measurer (:func:`~smcp_core.stages.measure.keep_measurer`) on the recipe's
    model and profile backend."""
    prof = recipe.profile
    return keep_measurer(build_model(recipe, load_weights=False), recipe, recipe, graph, workdir,
                         target_speedup=target_speedup, confidence=recipe.export.confidence,
                         min_rounds=max(30, prof.min_runs), max_seconds=min(20.0, prof.max_seconds / 2))


def _weight_masks(recipe: Recipe, model, bundle, pdir: Path, rep) -> dict:
    """The unstructured method's weight masks: decided once (before the first step) and stored in
    ``prune/weight_masks.pt``, so a resumed run keeps them."""

    path = pdir / "weight_masks.pt"
    pc = recipe.prune
    if dist.world() > 1 and not dist.is_main():  # rank 0 decides (below) and writes the file; every rank loads it
        dist.barrier()
        ck = load_torch(path, "weight masks", "delete it (and prune/checkpoint.pt) to start over", keys=("masks",))
        return {k: v.to(torch.bool) for k, v in ck["masks"].items()}
    if path.exists():
        ck = load_torch(path, "weight masks", "delete it (and prune/checkpoint.pt) to start over", keys=("masks",))
        if ck.get("method") == pc.method and ck.get("sparsity") == pc.sparsity:
            rep.log(f"{pc.method}: weight masks from {path}")
            dist.barrier()
            return {k: v.to(torch.bool) for k, v in ck["masks"].items()}
    batch = None
    if pc.method == "snip":
        loader = make_loader(bundle.train, batch_size=recipe.data.batch_size, shuffle=True, seed=recipe.seed)
        batch = next(iter(loader))
        model.train()
    masks = unstructured_masks(pc.method, model, pc.sparsity, batch, exclude=tuple(recipe.model.unpruned or ()),
                               label_smoothing=pc.label_smoothing)
    kept = sum(int(m.sum()) for m in masks.values())
    total = sum(int(m.numel()) for m in masks.values())
    rep.log(f"{pc.method}: {total - kept}/{total} weights of {len(masks)} layers set to zero "
            f"(sparsity {1 - kept / total:.3f}); they stay zero while fine-tuning")
    atomic_torch_save({"masks": {k: v.cpu() for k, v in masks.items()}, "method": pc.method,
                       "sparsity": pc.sparsity}, path, checksum=True)
    dist.barrier()
    return masks
