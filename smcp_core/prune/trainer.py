"""SMCP fine-tuning: dense warm-up, budget ramp with mask updates every N samples, frozen cooldown.

:class:`PruneTrainer` holds one run's state and steps; :func:`prune_train` builds one and runs it.
Checkpoints are written atomically at the end of every epoch; with ``resume=True`` a run continues
from the last one and, on CPU with the same recipe, reproduces the uninterrupted run exactly (data
order is seeded per epoch, RNG states are saved).  After each checkpoint ``metrics.csv`` is
rewritten (atomically) from the history stored in it, so a resumed run never duplicates rows.  A
non-finite loss or weight stops the run before the checkpoint is written: the last good checkpoint
stays as it was.
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from smcp_core.config import presets
from smcp_core.errors import SmcpError
from smcp_core.events import Reporter
from smcp_core.graph.channel_graph import ChannelGraph
from smcp_core.profile.cost_model import CostModel
from smcp_core.prune import methods
from smcp_core.prune.allocator import Allocator
from smcp_core.prune.bn_recalibration import recalibrate_bn
from smcp_core.prune.closed_loop import ClosedLoop, LatencyCheck
from smcp_core.prune.distill import Teacher, distillation_loss
from smcp_core.prune.metrics import write_metrics_csv
from smcp_core.prune.pruner import Pruner, StepSchedule
from smcp_core.utils import dist
from smcp_core.utils.fsutil import atomic_torch_save, load_torch

CHECKPOINT = "checkpoint.pt"


METRICS = "metrics.csv"


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

    def global_step(self, epoch: int, step: int) -> int:
        """Optimizer steps done after ``step`` steps of ``epoch`` (step counted from 1): what the
        pruner's :class:`StepSchedule` counts (its ``progress`` is the ramp progress)."""
        return epoch * self.steps_per_epoch + step


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


# recipe sections whose values shape the training run: a resumed run must have been started with the
# same values, else its result belongs to neither recipe
RESUME_SECTIONS = ("model", "data", "prune", "seed")
# keys that may change on --resume: they do not change what is trained (how often to evaluate, how
# many loader processes), or they are the documented way out of a diverged run ("lower
# prune.optimizer.lr and resume with --resume")
RESUME_MAY_CHANGE = frozenset({"prune.eval_every", "data.workers", "prune.optimizer.lr"})


def started_with(recipe) -> dict:
    """What a checkpoint records of the recipe it was trained with (plain JSON values)."""
    r = recipe.model_dump(mode="json")
    return {k: r[k] for k in RESUME_SECTIONS if k in r}


def _flatten(value: Any, prefix: str) -> dict[str, Any]:
    if isinstance(value, dict) and value:
        out: dict[str, Any] = {}
        for k, v in value.items():
            out.update(_flatten(v, f"{prefix}.{k}" if prefix else str(k)))
        return out
    return {prefix: value}


def changed_keys(old: dict, new: dict) -> list[str]:
    """Dotted keys whose values differ between two :func:`started_with` records (those in
    :data:`RESUME_MAY_CHANGE` left out), sorted."""
    a, b = _flatten(old, ""), _flatten(new, "")
    return sorted(k for k in set(a) | set(b) if a.get(k) != b.get(k) and k not in RESUME_MAY_CHANGE)


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """The trainer's optimizer groups: weight decay on weights, none on 1-d parameters (batch norms,
    biases); frozen parameters left out."""
    decay, no_decay = [], []
    for _name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (no_decay if p.dim() <= 1 else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def sgd_for(model: nn.Module, pc) -> torch.optim.SGD:
    """SGD as ``prune.optimizer`` says, on :func:`param_groups` of ``model``."""
    return torch.optim.SGD(param_groups(model, pc.optimizer.weight_decay), lr=pc.optimizer.lr,
                           momentum=pc.optimizer.momentum, nesterov=pc.optimizer.nesterov)


def lr_at(cfg, base_lr: float, epoch_f: float, epochs: int) -> float:
    """``cfg.lr_schedule`` (cosine / step / constant after a linear warm-up) at fractional epoch
    ``epoch_f`` of ``epochs``, from ``base_lr``."""
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
    if dist.active():
        for b in model.buffers():
            dist.broadcast_(b)


@dataclass
class EpochStats:
    """Running sums of one training epoch (tensors on the device) and the last step's learning rate."""

    loss_sum: torch.Tensor
    correct: torch.Tensor
    seen: int = 0
    lr: float = 0.0


def _delegated(name: str) -> property:
    """A trainer attribute that is its pruner's (read and written there)."""
    return property(lambda self: getattr(self.pruner, name), lambda self, v: setattr(self.pruner, name, v),
                    doc=f"The run's ``Pruner.{name}``.")


class PruneTrainer:
    """One SMCP fine-tuning run (see the module docstring).  Construction prepares the run (device,
    phase plan, :class:`Pruner`, optimizer); :meth:`run` resumes from the checkpoint if asked, trains
    and returns the :class:`TrainResult`.  The pruning state (masks, importance, budget, update
    counters) lives on the pruner; the trainer's epochs, history and closed loop on the instance."""

    masker = _delegated("masker")
    tracker = _delegated("tracker")
    bn_scaler = _delegated("bn_scaler")
    alloc = _delegated("alloc")
    method = _delegated("method")
    full = _delegated("full")
    target_cost = _delegated("target_cost")
    since_update = _delegated("since_update")
    last_progress = _delegated("last_progress")
    masked_any = _delegated("masked_any")
    bn_stale = _delegated("bn_stale")

    def __init__(self, *, recipe, model: nn.Module, graph: ChannelGraph, cost: CostModel, target_cost: float,
                 train_set, val_set, out_dir: Path, resume: bool = False, reporter: Reporter | None = None,
                 make_loader: Callable[..., Any], weight_masks: dict | None = None,
                 latency_check: LatencyCheck | None = None, allocator: Allocator | None = None) -> None:
        self.rep = reporter or Reporter()
        self.recipe = recipe
        self.pc = recipe.prune
        self.graph = graph
        self.cost = cost
        self.train_set = train_set
        self.val_set = val_set
        self.make_loader = make_loader
        self.resume_requested = resume
        self.latency_check = latency_check
        self._setup_device(model, out_dir)
        self._setup_plan()
        self._setup_pruning(target_cost, weight_masks, allocator)
        self._setup_optimizer()
        self._check_target()
        self.history = self.pruner.history  # one list: the pruner's mask updates and the run's other rows
        self.start_epoch = 0

    # ------------------------------------------------------------------ setup
    def _setup_device(self, model: nn.Module, out_dir: Path) -> None:
        """The device, the output folder, the seed, and the model moved there (SyncBatchNorm under DDP)."""
        pc = self.pc
        self.device = dist.local_device(pc.device, warn=self.rep.log)
        if self.device.type == "cuda" and not torch.cuda.is_available():
            raise SmcpError(f"prune.device is {pc.device} but CUDA is not available; set --set prune.device=cpu")
        self.out_dir = Path(out_dir)
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self.ck_path = self.out_dir / CHECKPOINT
        torch.manual_seed(self.recipe.seed)
        model.to(self.device)
        if pc.channels_last:
            model.to(memory_format=torch.channels_last)
        # the dense starting model (its checkpoint, before any mask) teaches the pruned one; every
        # rank makes its own copy, and a resumed run rebuilds it from the same start checkpoint
        if pc.distill.enabled and not self.recipe.model.checkpoint:
            raise SmcpError("prune.distill.enabled needs model.checkpoint: the dense model it starts from "
                            "is the teacher, and without a checkpoint that is a random network; give the "
                            "trained model's weights, or set prune.distill.enabled=false")
        self.teacher = Teacher(model) if pc.distill.enabled else None
        self.world = dist.world()
        if pc.sync_bn and self.world > 1:
            model = nn.SyncBatchNorm.convert_sync_batchnorm(model)  # same module names: masks still apply
        self.model = model

    def _setup_pruning(self, target_cost: float, weight_masks: dict | None, allocator: Allocator | None) -> None:
        """The run's :class:`Pruner` (method, masks, BN scaler, unstructured zeroer, importance,
        allocator), on the phase plan's schedule in optimizer steps."""
        plan = self.plan
        spe = plan.steps_per_epoch
        schedule = StepSchedule(warmup=plan.warmup * spe, ramp=plan.ramp * spe, update_every=plan.interval_steps,
                                hold=max(0, plan.prune_end_epoch - plan.warmup - plan.ramp) * spe)
        self.pruner = Pruner(self.model, self.graph, self.cost, target_cost=target_cost, config=self.pc,
                             schedule=schedule, reporter=self.rep, weight_masks=weight_masks, allocator=allocator,
                             device=self.device)

    def _setup_optimizer(self) -> None:
        """SGD, the AMP grad scaler, and the forward module (DDP-wrapped with more than one rank;
        ``self.model`` stays the plain module)."""
        pc = self.pc
        self.opt = sgd_for(self.model, pc)
        self.use_amp = bool(pc.amp) and self.device.type == "cuda"
        self.amp_dtype = torch.bfloat16 if pc.amp_dtype == "bfloat16" else torch.float16
        self.scaler = torch.amp.GradScaler("cuda", enabled=self.use_amp and self.amp_dtype == torch.float16)
        if self.world > 1:
            from torch.nn.parallel import DistributedDataParallel

            ids = [self.device.index] if self.device.type == "cuda" else None
            self.fwd = DistributedDataParallel(self.model, device_ids=ids)
        else:
            self.fwd = self.model

    def _setup_plan(self) -> None:
        """Steps per epoch, the mask-update interval, the phase plan and the validation loader."""
        pc = self.pc
        self.bs = bs = self.recipe.data.batch_size
        self.accum = accum = pc.grad_accum
        n_train = len(self.train_set)
        self.n_local = n_train // self.world if self.world > 1 else n_train  # each rank reads its own share
        steps_per_epoch = max(1, self.n_local // (bs * accum)) if self.n_local >= bs * accum else 1
        if pc.max_steps:
            steps_per_epoch = min(steps_per_epoch, pc.max_steps)
        # the update interval is in samples of the global batch: every rank updates at the same step
        interval_steps = max(1, math.ceil(pc.update_interval_samples / (bs * accum * self.world)))
        self.plan = PhasePlan(pc.epochs, pc.warmup_epochs, pc.ramp_epochs, pc.cooldown_epochs, steps_per_epoch, bs,
                              interval_steps)
        self.val_loader = (self.make_loader(self.val_set, batch_size=max(bs, 64), shuffle=False, seed=self.recipe.seed,
                                            pin_memory=self.device.type == "cuda")
                           if self.val_set is not None else None)

    def _check_target(self) -> None:
        """Log a target at or above the full cost; a uniform method checks reachability before any epoch."""
        if self.target_cost >= self.full:
            self.rep.log(f"target cost {self.target_cost:.4g} {self.cost.unit} is not below the full model's "
                         f"{self.full:.4g}: nothing to prune")
        elif self.method.allocation == "uniform":  # reachable with one fraction everywhere?
            self.alloc.solve_uniform(torch.zeros(self.graph.n_classes), self.target_cost)

    # ------------------------------------------------------------------ the run
    def run(self) -> TrainResult:
        """Resume (if asked and a checkpoint exists), prune one-shot or over the epochs, and finish."""
        if self.resume_requested and self.ck_path.exists():
            self.resume()
        self.masked_any = not bool(self.masker.keep().all())
        plan = self.plan
        if plan.prune_end_epoch <= plan.warmup and self.start_epoch == 0 and self.target_cost < self.full:
            self.one_shot()
        if (self.method.name != "smcp" and self.start_epoch == 0
                and not any(r.get("event") == "method" for r in self.history)):
            self.history.append({"event": "method", **presets.describe(self.pc)})
        for epoch in range(self.start_epoch, plan.epochs):
            self.train_epoch(epoch)
        return self.finish()

    def resume(self) -> None:
        """Load the checkpoint: weights, optimizer, masks, importance, BN scales, counters, history, RNG
        and (from the history) the closed loop's calibration and budget."""
        ck = load_torch(self.ck_path, "checkpoint", "delete it to start over (or run without --resume)",
                        keys=("model", "optimizer", "mask", "importance", "epoch", "since_update", "history",
                              "rng", "n_classes"))
        if ck.get("n_classes") != self.graph.n_classes:
            raise SmcpError(f"checkpoint {self.ck_path} was made for a different model; delete it or use another --out")
        if ck.get("recipe") is not None:  # (checkpoints written before it was recorded: nothing to compare)
            changed = changed_keys(ck["recipe"], started_with(self.recipe))
            if changed:
                raise SmcpError(f"checkpoint {self.ck_path} was started with another recipe (changed: "
                                f"{', '.join(changed)}); resume with the same recipe, or run without --resume "
                                "to start over")
        self.model.load_state_dict(ck["model"])
        self.opt.load_state_dict(ck["optimizer"])
        self.pruner.load_state_dict(ck, history=False, budget=False)  # the budget: from the history, below
        self.start_epoch = int(ck["epoch"])
        self.history[:] = list(ck["history"])
        torch.set_rng_state(ck["rng"])
        if ck.get("scaler") and self.use_amp:
            self.scaler.load_state_dict(ck["scaler"])
        self.rep.log(f"resumed from {self.ck_path} at epoch {self.start_epoch}")
        cl = [r for r in self.history if r.get("event") == "closed_loop" and "scale" in r]
        if cl:  # the closed loop re-calibrated the cost model and tightened the budget: keep both
            last = cl[-1]
            self.cost.scale, self.cost.removed_cost = last["scale"], last["removed_layer_ms"]
            self.target_cost = last["budget"]

    def one_shot(self) -> None:
        """No training epochs in the pruning window: importance from a few batches (none for filter
        norms), one mask update at the target, then the closed loop if there is one."""
        loader = self.make_loader(self.train_set, batch_size=self.bs, shuffle=True, seed=self.recipe.seed,
                                  pin_memory=self.device.type == "cuda")
        self.model.train()
        if self.method.name != "smcp":
            self.history.append({"event": "method", **presets.describe(self.pc)})
        # filter norms (l1, sfp) need no gradient: the weights alone decide, before any step
        for i, (x, y) in enumerate(loader if self.tracker.kind not in methods.FILTER_KINDS else ()):
            if i >= max(1, min(self.plan.steps_per_epoch, 8)):
                break
            x, y = x.to(self.device), y.to(self.device)
            loss = F.cross_entropy(self.fwd(x), y, label_smoothing=self.pc.label_smoothing)
            self.opt.zero_grad(set_to_none=True)
            loss.backward()
            self.tracker.update()
        self.opt.zero_grad(set_to_none=True)
        self.pruner.update_masks(1.0, 0)
        if self.latency_check is not None:
            self.closed_loop(0)

    # ------------------------------------------------------------------ one epoch
    def train_epoch(self, epoch: int) -> None:
        """One epoch of optimizer steps (with mask updates in the pruning window), the window's
        last update and closed loop, the epoch's history row and checkpoint."""
        self.model.train()
        loader = self.make_loader(self.train_set, batch_size=self.bs, shuffle=True, seed=self.recipe.seed + epoch,
                                  drop_last=self.n_local >= self.bs, pin_memory=self.device.type == "cuda",
                                  **({"shard": True} if self.world > 1 else {}))
        batches = iter(loader)
        pruning = self.plan.warmup <= epoch < self.plan.prune_end_epoch and self.target_cost < self.full
        t_epoch = time.perf_counter()
        stats = EpochStats(loss_sum=torch.zeros((), dtype=torch.float64, device=self.device),
                           correct=torch.zeros((), dtype=torch.long, device=self.device))
        for step in range(1, self.plan.steps_per_epoch + 1):
            micro = self._next_micro_batches(batches)
            if micro is None:
                break
            self._step(epoch, step, micro, pruning, stats)
        self._end_of_window(epoch, pruning)
        if not all(bool(torch.isfinite(p.detach()).all()) for p in self.model.parameters()):
            raise self._diverged("the weights became non-finite (inf/nan)", epoch, None)
        _sync_buffers(self.model)  # batch-norm statistics of rank 0 everywhere (no-op in one process)
        self.epoch_row(epoch, stats, t_epoch)
        if dist.is_main():
            self.checkpoint(epoch)

    def _next_micro_batches(self, batches) -> list | None:
        """The next ``grad_accum`` batches, or None when the loader has fewer left."""
        micro = []
        for _ in range(self.accum):
            try:
                micro.append(next(batches))
            except StopIteration:
                break
        return micro if len(micro) == self.accum else None

    def _step(self, epoch: int, step: int, micro: list, pruning: bool, stats: EpochStats) -> None:
        """One optimizer step over ``micro``: LR, forward/backward, the pruner's bookkeeping around
        the step itself (importance, pruned decay; re-zeroing, a mask update when the interval is
        reached), progress."""
        pc, plan, opt = self.pc, self.plan, self.opt
        stats.lr = lr = lr_at(pc, pc.optimizer.lr, epoch + (step - 1) / plan.steps_per_epoch, plan.epochs)
        for gparam in opt.param_groups:
            gparam["lr"] = lr
        opt.zero_grad(set_to_none=True)
        for i, (x, y) in enumerate(micro):
            self._forward_backward(epoch, step, i, x, y, stats)
        if self.scaler.is_enabled():
            self.scaler.unscale_(opt)
        self.pruner.before_step(importance=pruning)
        self.scaler.step(opt)
        self.scaler.update()
        self.pruner.after_step(progress=self.pruner.schedule.progress(plan.global_step(epoch, step)), epoch=epoch)
        if self._host_check(step) or step == plan.steps_per_epoch:
            self.rep.progress("epoch", step, plan.steps_per_epoch,
                              f"epoch {epoch + 1}/{plan.epochs} loss {float(stats.loss_sum) / max(stats.seen, 1):.3f}")

    def _forward_backward(self, epoch: int, step: int, i: int, x, y, stats: EpochStats) -> None:
        """Forward and backward of micro-batch ``i``, with the finiteness check and the running sums."""
        pc, device = self.pc, self.device
        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        if pc.channels_last and x.dim() == 4:
            x = x.contiguous(memory_format=torch.channels_last)
        # gradients are all-reduced across ranks once per optimizer step, at the last micro-batch
        sync = contextlib.nullcontext() if (self.world == 1 or i == self.accum - 1) else self.fwd.no_sync()
        with sync:
            with torch.autocast(device.type, dtype=self.amp_dtype, enabled=self.use_amp):
                logits = self.fwd(x)
                if self.teacher is not None:
                    loss = distillation_loss(logits, self.teacher(x), y, alpha=pc.distill.alpha,
                                             temperature=pc.distill.temperature,
                                             label_smoothing=pc.label_smoothing)
                else:
                    loss = F.cross_entropy(logits, y, label_smoothing=pc.label_smoothing)
            # the finiteness check reads the loss on the host: every step on CPU (free), every
            # 20th on a GPU so that the hot path does not wait for the device
            if self._host_check(step) and not torch.isfinite(loss.detach()).all():
                raise self._diverged(f"loss became {float(loss.detach())}", epoch, step)
            self.scaler.scale(loss / self.accum if self.accum > 1 else loss).backward()
        stats.correct = stats.correct + (logits.detach().argmax(1) == y).sum()
        stats.loss_sum = stats.loss_sum + loss.detach().float() * x.shape[0]
        stats.seen += x.shape[0]

    def _host_check(self, step: int) -> bool:
        """Whether ``step`` reads device values on the host (every step on CPU, every 20th on a GPU)."""
        return self.device.type != "cuda" or step % 20 == 0

    def _diverged(self, what: str, epoch: int, step: int | None) -> SmcpError:
        """The error for a non-finite loss or weight, naming the checkpoint to resume from."""
        at = f"epoch {epoch + 1} step {step}" if step is not None else f"the end of epoch {epoch + 1}"
        where = (f"the last good checkpoint is {self.ck_path} (epoch {epoch}); lower prune.optimizer.lr and "
                 "resume with --resume" if self.ck_path.exists() else
                 "no checkpoint was written yet; lower prune.optimizer.lr and start again")
        return SmcpError(f"{what} at {at}; {where}")

    def _end_of_window(self, epoch: int, pruning: bool) -> None:
        """After a pruning-window epoch's steps: SFP's zeroing, the window's last update at the full
        target, and the closed loop after the window's last epoch."""
        plan = self.plan
        last = epoch == plan.prune_end_epoch - 1
        if pruning and self.method.soft_filter:
            prog = self.pruner.schedule.progress(plan.global_step(epoch, plan.steps_per_epoch))
            # SFP: filters zeroed at every window epoch's end; the last one (at the target) is masked
            if prog < 1.0:
                self.pruner.sfp_step(prog, epoch)
            else:
                self.pruner.update_masks(1.0, epoch)
        elif pruning and last:
            self.pruner.finish_window(epoch)  # the last update of the pruning window is at the full target
        if (self.latency_check is not None and pruning and last
                and not any(r.get("event") == "closed_loop" for r in self.history)):
            self.closed_loop(epoch)

    def epoch_row(self, epoch: int, stats: EpochStats, t_epoch: float) -> dict:
        """The epoch's history row (loss, LR, cost, budget, accuracy), appended and reported."""
        pc, cost = self.pc, self.cost
        keep_now = self.masker.keep().cpu()
        budget_now = next((r["budget"] for r in reversed(self.history) if r.get("event") == "mask_update"), self.full)
        row = {"event": "epoch", "epoch": epoch + 1, "loss": float(stats.loss_sum) / max(stats.seen, 1), "lr": stats.lr,
               "seconds": time.perf_counter() - t_epoch, "cost": cost.total(keep_now)}
        row["predicted"] = cost.calibrated(row["cost"])
        row["train_top1"] = 100.0 * int(stats.correct) / max(stats.seen, 1)
        row["budget"] = budget_now
        row["budget_predicted"] = cost.calibrated(budget_now)
        row["kept_classes"] = int(keep_now.sum())
        row["total_classes"] = int(self.graph.n_classes)
        if self.val_loader is not None and (pc.eval_every and ((epoch + 1) % pc.eval_every == 0
                                                               or epoch + 1 == self.plan.epochs)):
            self.recalibrate_bn_stats(epoch)
            row["top1"] = evaluate(self.model, self.val_loader, self.device, channels_last=pc.channels_last)
        self.history.append(row)
        self.rep.metrics(row)
        return row

    def checkpoint(self, epoch: int) -> None:
        """Write the end-of-epoch checkpoint (atomically), then ``metrics.csv`` from its history."""
        atomic_torch_save({
            **self.pruner.state_dict(history=False),  # masks, importance, BN scales, counters
            "model": self.model.state_dict(), "optimizer": self.opt.state_dict(),
            "epoch": epoch + 1, "history": self.history, "rng": torch.get_rng_state(),
            "scaler": self.scaler.state_dict() if self.scaler.is_enabled() else None,
            "recipe": started_with(self.recipe),
        }, self.ck_path, checksum=True)
        write_metrics_csv(self.out_dir / METRICS, self.history, unit=self.cost.unit)  # from the checkpointed history

    # ------------------------------------------------------------------ batch norm statistics
    def recalibrate_bn_stats(self, epoch: int) -> None:
        """Re-estimate the batch norms' running statistics at the current masks when a mask change
        made them stale (``prune.bn_recalibration_batches`` training batches; 0 = off).  The batches
        come from a loader of their own (seeded per epoch, sharded like training): the training
        run's batches and RNG stream are unchanged (:func:`recalibrate_bn`).  Recorded as a
        ``bn_recalibration`` history row."""
        n = self.pc.bn_recalibration_batches
        if not n or not self.bn_stale:
            return
        t0 = time.perf_counter()
        loader = self.make_loader(self.train_set, batch_size=self.bs, shuffle=True,
                                  seed=self.recipe.seed + 100_003 + epoch, drop_last=self.n_local >= self.bs,
                                  pin_memory=self.device.type == "cuda", **({"shard": True} if self.world > 1 else {}))
        used = recalibrate_bn(self.model, loader, n, device=self.device, channels_last=self.pc.channels_last)
        self.bn_stale = False
        self.pruner.record({"event": "bn_recalibration", "epoch": epoch, "batches": used,
                            "seconds": time.perf_counter() - t0})

    # ------------------------------------------------------------------ latency closed loop
    def closed_loop(self, epoch: int) -> None:
        """Measure the slim model at the current masks and correct them (:class:`ClosedLoop`)."""
        ClosedLoop(self.pruner, self.latency_check).run(epoch)

    # ------------------------------------------------------------------ the end
    def finish(self) -> TrainResult:
        """``metrics.csv`` once more, the target enforced, the final accuracy, BN scales baked in,
        and the dense state dict with the masks applied."""
        # again after the epochs: a run killed between its last checkpoint and the CSV resumes with no epoch left
        if dist.is_main():
            write_metrics_csv(self.out_dir / METRICS, self.history, unit=self.cost.unit)
        self.pruner.enforce_target(self.plan.epochs)  # e.g. resumed after the window with a changed target
        keep = self.masker.keep().cpu()
        final_cost = self.cost.total(keep)
        final_top1 = next((r["top1"] for r in reversed(self.history) if r.get("event") == "epoch" and "top1" in r),
                          None)
        self.recalibrate_bn_stats(self.plan.epochs)  # the saved model's statistics match its final masks
        if final_top1 is None and self.val_loader is not None:
            final_top1 = evaluate(self.model, self.val_loader, self.device, channels_last=self.pc.channels_last)
        state = self.pruner.bake_state_dict()
        return TrainResult(keep=keep, history=self.history, final_top1=final_top1, target_cost=self.target_cost,
                           final_cost=final_cost, full_cost=self.full, unit=self.cost.unit, state_dict=state)


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
    allocator: Allocator | None = None,
) -> TrainResult:
    """Run SMCP on ``model`` (modified in place: masks are registered on it) and return the final
    keep-mask.  ``target_cost`` is the layer-sum budget the final masks must meet.
    ``weight_masks`` (unstructured methods): ``{module name: bool mask}`` of weights held at zero
    from the first step on.  ``allocator``: the run's :class:`Allocator` (built from the recipe
    when not given)."""
    return PruneTrainer(recipe=recipe, model=model, graph=graph, cost=cost, target_cost=target_cost,
                        train_set=train_set, val_set=val_set, out_dir=out_dir, resume=resume, reporter=reporter,
                        make_loader=make_loader, weight_masks=weight_masks, latency_check=latency_check,
                        allocator=allocator).run()
