"""SMCP fine-tuning: dense warm-up, budget ramp with mask updates every N samples, frozen cooldown.

Checkpoints are written atomically at the end of every epoch; :func:`prune_train` with
``resume=True`` continues from the last one and, on CPU with the same recipe, reproduces the
uninterrupted run exactly (data order is seeded per epoch, RNG states are saved).  After each
checkpoint ``metrics.csv`` is rewritten (atomically) from the history stored in it, so a resumed run
never duplicates rows.  A non-finite loss or weight stops the run before the checkpoint is written:
the last good checkpoint stays as it was.
"""

from __future__ import annotations

import contextlib
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch
import torch.nn as nn
import torch.nn.functional as F

from . import dist as D
from . import methods as M
from .bnscale import BNScaler
from .errors import InfeasibleTarget, SmcpError
from .fsutil import atomic_torch_save, load_torch
from .graph import ChannelGraph
from .importance import ImportanceTracker
from .masking import Masker, masked_state_dict
from .pruner import Allocator, CostModel, PruneConfigLite
from .report import write_metrics_csv
from .schedule import budget_at

CHECKPOINT = "checkpoint.pt"
METRICS = "metrics.csv"


class Reporter:
    """Callbacks the CLI implements (no-ops here so the library works on its own)."""

    def log(self, msg: str) -> None:  # noqa: D401
        pass

    def progress(self, task: str, done: int, total: int, info: str = "") -> None:
        pass

    def metrics(self, row: dict) -> None:
        pass


@dataclass
class PhasePlan:
    epochs: int
    warmup: int
    ramp: int
    cooldown: int
    steps_per_epoch: int
    batch_size: int
    interval_steps: int

    @property
    def prune_end_epoch(self) -> int:
        """First epoch with frozen masks."""
        return self.epochs - self.cooldown

    def progress(self, epoch: int, step: int) -> float:
        """Ramp progress (0..1] after ``step`` steps of ``epoch`` (step counted from 1)."""
        if self.ramp <= 0:
            return 1.0
        done = (epoch - self.warmup) * self.steps_per_epoch + step
        return min(1.0, done / (self.ramp * self.steps_per_epoch))


@dataclass
class TrainResult:
    keep: torch.Tensor
    history: list[dict] = field(default_factory=list)
    final_top1: float | None = None
    baseline_top1: float | None = None
    target_cost: float = 0.0
    final_cost: float = 0.0
    full_cost: float = 0.0
    unit: str = ""
    state_dict: dict = field(default_factory=dict)  # dense weights with the final masks baked in


@dataclass
class LatencyCheck:
    """Closed-loop check of the latency target at the end of the pruning window (``prune.closed_loop``).

    ``measure(keep) -> (dense_ms, slim_ms)`` times the dense model and the model slimmed to ``keep``
    interleaved on the profile backend; the ratio, times ``baseline_ms`` (the table's dense
    latency), is the measured latency in the table's units.  When it is above ``target_ms`` (a
    miss), or more than ``overshoot`` below ``aim_ms`` while a later round can check the result
    (pruned deeper than asked, which costs accuracy), the measured point joins the calibration
    ``points`` (``(layer_sum, removed_layers, measured_ms)``), the calibration is re-fitted and the
    masks are re-solved for ``aim_ms``.  If the last measurement misses the target, the masks of the
    slowest measured round that met it are restored."""

    measure: Callable[[torch.Tensor], tuple[float, float]]
    baseline_ms: float
    target_ms: float
    aim_ms: float
    points: list = field(default_factory=list)
    rounds: int = 2
    overshoot: float = 0.1


def _param_groups(model: nn.Module, weight_decay: float):
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (no_decay if p.dim() <= 1 else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def _lr_at(cfg, base_lr: float, epoch_f: float, epochs: int) -> float:
    ls = cfg.lr_schedule
    if ls.warmup_epochs and epoch_f < ls.warmup_epochs:
        return base_lr * (epoch_f + 1e-9) / ls.warmup_epochs
    if ls.name == "constant" or epochs <= 0:
        return base_lr
    if ls.name == "step":
        factor = 0.1 ** sum(epoch_f >= m * epochs for m in (0.5, 0.75))
        return base_lr * factor
    t = (epoch_f - ls.warmup_epochs) / max(1e-9, epochs - ls.warmup_epochs)
    return ls.min_lr + (base_lr - ls.min_lr) * 0.5 * (1 + math.cos(math.pi * min(1.0, t)))


@torch.no_grad()
def evaluate(model: nn.Module, loader, device: torch.device, *, channels_last: bool = False,
             max_batches: int | None = None) -> float:
    """Top-1 accuracy (%) of ``model`` on ``loader``."""
    was = model.training
    model.eval()
    correct = total = 0
    for i, (x, y) in enumerate(loader):
        if max_batches is not None and i >= max_batches:
            break
        x = x.to(device)
        if channels_last and x.dim() == 4:
            x = x.contiguous(memory_format=torch.channels_last)
        pred = model(x).argmax(1).cpu()
        correct += int((pred == y).sum())
        total += int(y.numel())
    model.train(was)
    return 100.0 * correct / max(total, 1)


def _sync_buffers(model: nn.Module) -> None:
    if D.active():
        for b in model.buffers():
            D.broadcast_(b)


def prune_train(
    *,
    recipe,
    model: nn.Module,
    graph: ChannelGraph,
    cost: CostModel,
    target_cost: float,
    train_set,
    val_set,
    out_dir: Path,
    resume: bool = False,
    reporter: Reporter | None = None,
    make_loader: Callable[..., Any],
    weight_masks: dict | None = None,
    latency_check: LatencyCheck | None = None,
) -> TrainResult:
    """Run SMCP on ``model`` (modified in place: masks are registered on it) and return the final
    keep-mask.  ``target_cost`` is the layer-sum budget the final masks must meet.
    ``weight_masks`` (unstructured methods): ``{module name: bool mask}`` of weights held at zero
    from the first step on."""
    rep = reporter or Reporter()
    pc = recipe.prune
    dc = recipe.data
    device = D.local_device(pc.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SmcpError(f"prune.device is {pc.device} but CUDA is not available; set --set prune.device=cpu")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(recipe.seed)

    model.to(device)
    if pc.channels_last:
        model.to(memory_format=torch.channels_last)
    world = D.world()

    def host_check(step: int) -> bool:
        return device.type != "cuda" or step % 20 == 0

    if pc.sync_bn and world > 1:
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)  # same module names: masks still apply
    method = M.spec(getattr(pc, "method", "smcp"))
    masker = Masker(model, graph, mode=pc.masking)
    masker.to(device)
    bn_scaler = BNScaler(model, graph, pc.bn_rescaling).to(device)
    zero_weights = M.WeightZeroer(model, weight_masks, device) if weight_masks else None
    if zero_weights is not None:
        zero_weights()
    tracker = ImportanceTracker(masker, kind=pc.importance.type, accumulate=pc.importance.accumulate,
                                momentum=pc.importance.momentum)
    alloc = Allocator(graph, cost, PruneConfigLite(pc.channel_round, pc.min_channels, pc.layer_pruning, pc.stickiness,
                                                   cost_weight=pc.cost_weight))
    opt = torch.optim.SGD(_param_groups(model, pc.optimizer.weight_decay), lr=pc.optimizer.lr,
                          momentum=pc.optimizer.momentum, nesterov=pc.optimizer.nesterov)
    use_amp = bool(pc.amp) and device.type == "cuda"
    amp_dtype = torch.bfloat16 if pc.amp_dtype == "bfloat16" else torch.float16
    scaler = torch.amp.GradScaler("cuda", enabled=use_amp and amp_dtype == torch.float16)
    # data parallel: the model is wrapped for the forward/backward; ``model`` stays the plain module
    if world > 1:
        from torch.nn.parallel import DistributedDataParallel

        fwd = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    else:
        fwd = model
    bs = dc.batch_size
    accum = pc.grad_accum
    n_train = len(train_set)
    n_local = n_train // world if world > 1 else n_train  # each rank reads its own share
    steps_per_epoch = max(1, n_local // (bs * accum)) if n_local >= bs * accum else 1
    if pc.max_steps:
        steps_per_epoch = min(steps_per_epoch, pc.max_steps)
    # the update interval is in samples of the global batch: every rank updates at the same step
    interval_steps = max(1, math.ceil(pc.update_interval_samples / (bs * accum * world)))
    plan = PhasePlan(pc.epochs, pc.warmup_epochs, pc.ramp_epochs, pc.cooldown_epochs, steps_per_epoch, bs, interval_steps)
    val_loader = make_loader(val_set, batch_size=max(bs, 64), shuffle=False, seed=recipe.seed) if val_set is not None else None

    full = alloc.full_cost
    if target_cost >= full:
        rep.log(f"target cost {target_cost:.4g} {cost.unit} is not below the full model's {full:.4g}: nothing to prune")
    elif method.allocation == "uniform":  # reachable with one fraction everywhere? (fails before any epoch)
        alloc.solve_uniform(torch.zeros(graph.n_classes), target_cost)
    history: list[dict] = []
    start_epoch = 0
    since_update = 0
    last_progress = 0.0
    ck_path = out_dir / CHECKPOINT
    if resume and ck_path.exists():
        ck = load_torch(ck_path, "checkpoint", "delete it to start over (or run without --resume)",
                        keys=("model", "optimizer", "mask", "importance", "epoch", "since_update", "history",
                              "rng", "n_classes"))
        if ck.get("n_classes") != graph.n_classes:
            raise SmcpError(f"checkpoint {ck_path} was made for a different model; delete it or use another --out")
        model.load_state_dict(ck["model"])
        opt.load_state_dict(ck["optimizer"])
        masker.set_keep(ck["mask"])
        tracker.load_state_dict(ck["importance"])
        if ck.get("bn_scales") is not None and bn_scaler.items:
            for (bn, _), sc in zip(bn_scaler.items, ck["bn_scales"]):
                bn.parametrizations.weight[0].s.fill_(float(sc))
        start_epoch = int(ck["epoch"])
        since_update = int(ck["since_update"])
        last_progress = float(ck.get("last_progress", 0.0))
        history = list(ck["history"])
        torch.set_rng_state(ck["rng"])
        if ck.get("scaler") and use_amp:
            scaler.load_state_dict(ck["scaler"])
        rep.log(f"resumed from {ck_path} at epoch {start_epoch}")
        cl = [r for r in history if r.get("event") == "closed_loop" and "scale" in r]
        if cl:  # the closed loop re-calibrated the cost model and tightened the budget: keep both
            cost.scale, cost.removed_cost, target_cost = cl[-1]["scale"], cl[-1]["removed_layer_ms"], cl[-1]["budget"]

    def _diverged(what: str, epoch: int, step: int | None) -> SmcpError:
        at = f"epoch {epoch + 1} step {step}" if step is not None else f"the end of epoch {epoch + 1}"
        where = (f"the last good checkpoint is {ck_path} (epoch {epoch}); lower prune.optimizer.lr and "
                 "resume with --resume" if ck_path.exists() else
                 "no checkpoint was written yet; lower prune.optimizer.lr and start again")
        return SmcpError(f"{what} at {at}; {where}")

    masked_any = [not bool(masker.keep().all())]  # something is masked (checkpoint or mask update)

    def apply_keep(keep: torch.Tensor, scores: torch.Tensor) -> None:
        """Install a keep-mask chosen from the (all-reduced) ``scores``: masks, SFP's zeroed filters,
        BN rescaling, and a new importance window."""
        masker.set_keep(keep)
        masked_any[0] = not bool(keep.all())
        if method.soft_filter:  # SFP's final selection: producers' filters zeroed too, then masked
            M.zero_filters_(masker, keep)
        bn_scaler.update(keep, scores)
        tracker.reset()

    def do_update(progress: float, epoch: int) -> dict:
        budget = budget_at(progress, full, target_cost, pc.schedule)
        t0 = time.perf_counter()
        scores = D.all_reduce_mean_(tracker.scores().detach().clone())  # identical on every rank
        if method.name == "smcp":
            res = alloc.solve(scores, budget, masker.keep())
        else:
            res = M.allocate(alloc, method, scores, budget, masker.keep().cpu())
        keep = D.broadcast_(res.keep.to(device=scores.device, dtype=torch.uint8)).cpu().bool()
        dt = time.perf_counter() - t0
        apply_keep(keep, scores)
        row = {"event": "mask_update", "epoch": epoch, "progress": round(progress, 4), "budget": budget,
               "cost": res.cost, "predicted": cost.calibrated(res.cost),
               "kept_classes": int(res.keep.sum()), "solve_ms": 1000 * dt}
        if res.fraction is not None:
            row["fraction"] = res.fraction
        rep.metrics(row)
        return row

    def sfp_step(progress: float, epoch: int) -> dict:
        """SFP at the end of a pruning-window epoch: zero the producers' output filters of the
        lowest-L2 classes at the uniform fraction for the scheduled budget; no masks."""
        budget = budget_at(progress, full, target_cost, pc.schedule)
        t0 = time.perf_counter()
        scores = D.all_reduce_mean_(tracker.scores().detach().clone())
        res = alloc.solve_uniform(scores, budget)
        keep = D.broadcast_(res.keep.to(device=scores.device, dtype=torch.uint8)).cpu().bool()
        zeroed = M.zero_filters_(masker, keep)
        row = {"event": "mask_update", "soft_filter": True, "epoch": epoch, "progress": round(progress, 4),
               "budget": budget, "cost": res.cost, "predicted": cost.calibrated(res.cost),
               "kept_classes": int(keep.sum()), "zeroed_filters": zeroed, "fraction": res.fraction,
               "solve_ms": 1000 * (time.perf_counter() - t0)}
        rep.metrics(row)
        return row

    def closed_loop(epoch: int) -> float:
        """Measure the slim model at the current masks; while it misses the target (or lands far
        below the aim with a round left to check a correction), add the point to the calibration,
        re-fit it and re-solve at the aim.  Returns the (new) budget."""
        from .pipeline import fit_calibration

        nonlocal target_cost
        chk = latency_check
        budget = target_cost
        best = None  # the slowest measured state that met the target: (measured, round, keep, calibration, budget)
        for rnd in range(chk.rounds + 1):
            keep = masker.keep().cpu()
            vals = torch.zeros(2, dtype=torch.float64)
            failure = None
            if D.is_main():
                try:
                    vals = torch.tensor(chk.measure(keep), dtype=torch.float64)
                except SmcpError as exc:  # every rank must hear of it, not wait in the broadcast
                    failure, vals = exc, torch.full((2,), float("nan"), dtype=torch.float64)
            dense_ms, slim_ms = (float(v) for v in D.broadcast_(vals.to(device)).cpu())
            if failure is not None or not (math.isfinite(dense_ms) and math.isfinite(slim_ms)):
                raise SmcpError(f"closed loop: measuring the slimmed model failed"
                                + (f": {failure}" if failure is not None else " on rank 0")) from None
            measured = slim_ms / dense_ms * chk.baseline_ms
            n_removed = sum(1 for ci, co in graph.widths(keep) if ci == 0 or co == 0)
            free_sum = cost.total(keep) - cost.removed_cost * n_removed
            met = measured <= chk.target_ms
            # a correction upwards is measured again in the next round; SFP's zeroed filters cannot return
            over = (met and measured < chk.aim_ms * (1 - chk.overshoot) and rnd < chk.rounds
                    and not method.soft_filter)
            row = {"event": "closed_loop", "epoch": epoch, "round": rnd, "predicted_ms": cost.predict(keep),
                   "measured_ms": measured, "dense_ms": dense_ms, "slim_ms": slim_ms, "target_ms": chk.target_ms,
                   "met": met}
            if met and (best is None or measured > best[0]):
                best = (measured, rnd, keep.clone(), (cost.scale, cost.removed_cost), target_cost)
            if (met and not over) or rnd == chk.rounds:
                if not met and best is not None:  # a correction made it worse: back to what was measured good
                    _, brnd, bkeep, (cost.scale, cost.removed_cost), target_cost = best
                    budget = target_cost
                    apply_keep(bkeep, D.all_reduce_mean_(tracker.scores().detach().clone()))
                    row.update(reverted_to_round=brnd, scale=cost.scale, removed_layer_ms=cost.removed_cost,
                               budget=budget)
                    rep.log(f"closed loop: {measured:.4g} ms misses the target {chk.target_ms:.4g} ms; restored "
                            f"the masks of round {brnd} (measured {best[0]:.4g} ms)")
                elif not met:
                    rep.log(f"closed loop: still {measured:.4g} ms > target {chk.target_ms:.4g} ms after "
                            f"{chk.rounds} corrections; raise prune.closed_loop or prune.target_margin")
                history.append(row)
                rep.metrics(row)
                break
            prev = (cost.scale, cost.removed_cost, target_cost)
            chk.points.append((free_sum, n_removed, measured))
            scale, removed = fit_calibration(chk.points)
            cost.scale, cost.removed_cost = scale, removed
            budget = cost.budget_for(chk.aim_ms)
            what = (f"more than {100 * chk.overshoot:.0f} % below the aim {chk.aim_ms:.4g} ms" if over
                    else f"> target {chk.target_ms:.4g} ms")
            rep.log(f"closed loop: measured {measured:.4g} ms {what} (predicted {row['predicted_ms']:.4g}); "
                    f"re-calibrated (scale {scale:.3f}, {removed:.4g} ms per removed layer) and re-solving for "
                    f"{chk.aim_ms:.4g} ms")
            if over:
                row["overshoot"] = True
            target_cost = budget
            try:
                update = do_update(1.0, epoch)
            except InfeasibleTarget as exc:  # keep the masks, calibration and budget we have; the run goes on
                cost.scale, cost.removed_cost, target_cost = prev
                budget = target_cost
                row.update(error=str(exc))
                history.append(row)
                rep.metrics(row)
                rep.log(f"closed loop: the re-fitted target is out of reach ({exc}); keeping the current masks")
                break
            row.update(scale=scale, removed_layer_ms=removed, budget=budget)
            history.append(row)
            rep.metrics(row)
            history.append(update)
        return budget

    # one-shot pruning (no training epochs in the pruning window): importance from a few batches
    if plan.prune_end_epoch <= plan.warmup and start_epoch == 0 and target_cost < full:
        loader = make_loader(train_set, batch_size=bs, shuffle=True, seed=recipe.seed)
        model.train()
        if method.name != "smcp":
            history.append({"event": "method", **M.describe(pc)})
        # filter norms (l1, sfp) need no gradient: the weights alone decide, before any step
        for i, (x, y) in enumerate(loader if tracker.kind not in M.FILTER_KINDS else ()):
            if i >= max(1, min(steps_per_epoch, 8)):
                break
            x, y = x.to(device), y.to(device)
            loss = F.cross_entropy(fwd(x), y, label_smoothing=pc.label_smoothing)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            tracker.update()
        opt.zero_grad(set_to_none=True)
        history.append(do_update(1.0, 0))
        last_progress = 1.0
        if latency_check is not None:
            closed_loop(0)

    if method.name != "smcp" and start_epoch == 0 and not any(r.get("event") == "method" for r in history):
        history.append({"event": "method", **M.describe(pc)})
    for epoch in range(start_epoch, plan.epochs):
        model.train()
        loader = make_loader(train_set, batch_size=bs, shuffle=True, seed=recipe.seed + epoch,
                             drop_last=n_local >= bs, **({"shard": True} if world > 1 else {}))
        batches = iter(loader)
        pruning = plan.warmup <= epoch < plan.prune_end_epoch and target_cost < full
        t_epoch = time.perf_counter()
        loss_sum, seen = 0.0, 0
        correct = torch.zeros((), dtype=torch.long, device=device)
        loss_sum = torch.zeros((), dtype=torch.float64, device=device)
        step = 0
        lr = 0.0
        for step in range(1, steps_per_epoch + 1):
            micro = []
            for _ in range(accum):
                try:
                    micro.append(next(batches))
                except StopIteration:
                    break
            if len(micro) < accum:
                step -= 1
                break
            lr = _lr_at(pc, pc.optimizer.lr, epoch + (step - 1) / steps_per_epoch, plan.epochs)
            for gparam in opt.param_groups:
                gparam["lr"] = lr
            opt.zero_grad(set_to_none=True)
            for i, (x, y) in enumerate(micro):
                x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
                if pc.channels_last and x.dim() == 4:
                    x = x.contiguous(memory_format=torch.channels_last)
                # gradients are all-reduced across ranks once per optimizer step, at the last micro-batch
                sync = contextlib.nullcontext() if (world == 1 or i == accum - 1) else fwd.no_sync()
                with sync:
                    with torch.autocast(device.type, dtype=amp_dtype, enabled=use_amp):
                        logits = fwd(x)
                        loss = F.cross_entropy(logits, y, label_smoothing=pc.label_smoothing)
                    # the finiteness check reads the loss on the host: every step on CPU (free), every
                    # 20th on a GPU so that the hot path does not wait for the device
                    if host_check(step) and not torch.isfinite(loss.detach()).all():
                        raise _diverged(f"loss became {float(loss.detach())}", epoch, step)
                    scaler.scale(loss / accum if accum > 1 else loss).backward()
                correct = correct + (logits.detach().argmax(1) == y).sum()
                loss_sum = loss_sum + loss.detach().float() * x.shape[0]
                seen += x.shape[0]
            if scaler.is_enabled():
                scaler.unscale_(opt)
            if pruning and not method.soft_filter:
                tracker.update()
            masker.apply_pruned_decay(pc.pruned_decay)
            scaler.step(opt)
            scaler.update()
            if method.rezero and masker.mode == "permanent" and masked_any[0]:
                M.rezero_pruned_(masker)  # pruned weights stay exactly zero (HALP re-zeroes every step)
            if zero_weights is not None:
                zero_weights()  # unstructured: the zeroed weights stay zero
            if pruning and not method.soft_filter:
                since_update += 1
                prog = plan.progress(epoch, step)
                if since_update >= plan.interval_steps:
                    history.append(do_update(prog, epoch))
                    last_progress = prog
                    since_update = 0
            if host_check(step) or step == steps_per_epoch:
                rep.progress("epoch", step, steps_per_epoch,
                             f"epoch {epoch + 1}/{plan.epochs} loss {float(loss_sum) / max(seen, 1):.3f}")
        if pruning and method.soft_filter:
            prog = plan.progress(epoch, steps_per_epoch)
            # SFP: filters zeroed at every window epoch's end; the last one (at the target) is masked
            history.append(sfp_step(prog, epoch) if prog < 1.0 else do_update(1.0, epoch))
            last_progress = prog
        elif pruning and epoch == plan.prune_end_epoch - 1 and (last_progress < 1.0 or since_update > 0):
            # the last update of the pruning window is always at the full target
            history.append(do_update(1.0, epoch))
            last_progress = 1.0
            since_update = 0
        if (latency_check is not None and pruning and epoch == plan.prune_end_epoch - 1
                and not any(r.get("event") == "closed_loop" for r in history)):
            closed_loop(epoch)
        if not all(bool(torch.isfinite(p.detach()).all()) for p in model.parameters()):
            raise _diverged("the weights became non-finite (inf/nan)", epoch, None)
        _sync_buffers(model)  # batch-norm statistics of rank 0 everywhere (no-op in one process)
        keep_now = masker.keep().cpu()
        budget_now = next((r["budget"] for r in reversed(history) if r.get("event") == "mask_update"), full)
        row = {"event": "epoch", "epoch": epoch + 1, "loss": float(loss_sum) / max(seen, 1), "lr": lr,
               "seconds": time.perf_counter() - t_epoch, "cost": cost.total(keep_now)}
        row["predicted"] = cost.calibrated(row["cost"])
        row["train_top1"] = 100.0 * int(correct) / max(seen, 1)
        row["budget"] = budget_now
        row["budget_predicted"] = cost.calibrated(budget_now)
        row["kept_classes"] = int(keep_now.sum())
        row["total_classes"] = int(graph.n_classes)
        if val_loader is not None and (pc.eval_every and ((epoch + 1) % pc.eval_every == 0 or epoch + 1 == plan.epochs)):
            row["top1"] = evaluate(model, val_loader, device, channels_last=pc.channels_last)
        history.append(row)
        rep.metrics(row)
        if not D.is_main():
            continue
        atomic_torch_save({
            "model": model.state_dict(), "optimizer": opt.state_dict(),
            "mask": masker.class_mask.detach().cpu(), "importance": tracker.state_dict(),
            "epoch": epoch + 1, "since_update": since_update, "last_progress": last_progress,
            "history": history, "rng": torch.get_rng_state(), "n_classes": graph.n_classes,
            "scaler": scaler.state_dict() if scaler.is_enabled() else None,
            "bn_scales": bn_scaler.scales() or None,
        }, ck_path, checksum=True)
        write_metrics_csv(out_dir / METRICS, history, unit=cost.unit)  # from the checkpointed history

    # again after the loop: a run killed between its last checkpoint and the CSV resumes with no epoch left
    if D.is_main():
        write_metrics_csv(out_dir / METRICS, history, unit=cost.unit)

    keep = masker.keep().cpu()
    final_cost = cost.total(keep)
    if target_cost < full and final_cost > target_cost * (1 + 1e-9):
        # e.g. resumed after the pruning window with a changed target: enforce it now
        history.append(do_update(1.0, plan.epochs))
        keep = masker.keep().cpu()
        final_cost = cost.total(keep)
    final_top1 = None
    for r in reversed(history):
        if r.get("event") == "epoch" and "top1" in r:
            final_top1 = r["top1"]
            break
    if final_top1 is None and val_loader is not None:
        final_top1 = evaluate(model, val_loader, device, channels_last=pc.channels_last)
    bn_scaler.bake()  # gamma_orig * s into plain parameters before the weights are handed over
    state = {k: v.detach().cpu().clone() for k, v in masked_state_dict(model, masker).items()}
    return TrainResult(keep=keep, history=history, final_top1=final_top1, target_cost=target_cost,
                       final_cost=final_cost, full_cost=full, unit=cost.unit, state_dict=state)
