"""The pruning bookkeeping of one SMCP run, independent of who owns the training loop.

:class:`Pruner` holds the masks, the importance scores, the BN rescaling, the allocator and the
budget schedule of one model.  Two loops drive it with the same code:

* ``smcp prune`` (:class:`~smcp_core.prune.trainer.PruneTrainer`): epochs, phases and the closed
  loop; it passes the ramp progress and the epoch explicitly;
* a loop the user owns (:mod:`smcp_core.api`): one :meth:`Pruner.before_step` after
  ``loss.backward()`` and one :meth:`Pruner.after_step` after ``optimizer.step()``; the pruner
  counts optimizer steps itself and follows its :class:`StepSchedule`.

Every mask update is solved once, on rank 0, from scores all-reduced over the ranks, and its result
(keep-mask, cost, value) broadcast to the others, so the masks are identical on every rank and the
other ranks spend no CPU time on the solve (no-op in one process).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from smcp_core.config import presets
from smcp_core.errors import InfeasibleTarget, SmcpError
from smcp_core.events import Reporter
from smcp_core.graph.channel_graph import ChannelGraph
from smcp_core.profile.cost_model import CostModel
from smcp_core.prune import methods
from smcp_core.prune.allocator import Allocator, SolveResult
from smcp_core.prune.bnscale import BNScaler
from smcp_core.prune.importance import ImportanceTracker
from smcp_core.prune.masking import Masker, masked_state_dict
from smcp_core.prune.schedule import budget_at
from smcp_core.utils import dist


@dataclass(frozen=True)
class StepSchedule:
    """When masks change, in optimizer steps counted from 1: dense for ``warmup`` steps, the budget
    ramps from the full cost to the target over the next ``ramp`` steps (a mask update every
    ``update_every`` steps), ``hold`` more steps of updates at the target, one update at the target
    at the window's last step ``warmup + ramp + hold``; masks frozen after it."""

    warmup: int
    ramp: int
    update_every: int
    hold: int = 0

    def __post_init__(self) -> None:
        for name in ("warmup", "ramp", "hold"):
            if int(getattr(self, name)) < 0:
                raise SmcpError(f"schedule {name}={getattr(self, name)} must be >= 0 steps")
        if int(self.update_every) < 1:
            raise SmcpError(f"schedule update_every={self.update_every} must be >= 1 step")

    @property
    def end(self) -> int:
        """The last step of the pruning window (masks frozen after it)."""
        return self.warmup + self.ramp + self.hold

    def in_window(self, step: int) -> bool:
        return self.warmup < step <= self.end

    def progress(self, step: int) -> float:
        """Ramp progress (0..1] after ``step`` steps."""
        if self.ramp <= 0:
            return 1.0
        return min(1.0, (step - self.warmup) / self.ramp)


@dataclass
class _Solved:
    """A solved mask update: the keep-mask broadcast from rank 0, the all-reduced scores it was
    solved from, the solver's result, the common fields of its history row and the solve's start time."""

    keep: torch.Tensor
    scores: torch.Tensor
    result: SolveResult
    row: dict
    t0: float


class Pruner:
    """Masks, importance, BN rescaling and mask updates of one model (see the module docstring).

    ``config`` is the recipe's ``prune`` section (:class:`~smcp_core.config.recipe.PruneConfig`):
    method, masking, importance, schedule shape, pruned decay, channel rounding.  ``target_cost``
    is the layer-sum budget (in ``cost``'s unit) the final masks must meet.  ``schedule`` sets the
    update interval; a loop that passes no ``progress`` to :meth:`after_step` follows it entirely.  Rows of
    every mask update go to :attr:`history` (and ``reporter.metrics``)."""

    def __init__(self, model: nn.Module, graph: ChannelGraph, cost: CostModel, *, target_cost: float, config,
                 schedule: StepSchedule | None = None, reporter: Reporter | None = None,
                 weight_masks: dict | None = None, allocator: Allocator | None = None,
                 device: torch.device | None = None) -> None:
        self.rep = reporter or Reporter()
        self.pc = config
        self.graph, self.cost, self.model = graph, cost, model
        self.target_cost = float(target_cost)
        self.schedule = schedule
        self.device = device if device is not None else next(model.parameters()).device
        self.method = presets.spec(getattr(config, "method", "smcp"))
        self.masker = Masker(model, graph, mode=config.masking)
        self.masker.to(self.device)
        self.bn_scaler = BNScaler(model, graph, config.bn_rescaling).to(self.device)
        self.zero_weights = methods.WeightZeroer(model, weight_masks, self.device) if weight_masks else None
        if self.zero_weights is not None:
            self.zero_weights()
        imp = config.importance
        self.tracker = ImportanceTracker(self.masker, kind=imp.type, accumulate=imp.accumulate,
                                         momentum=imp.momentum)
        self.alloc = allocator if allocator is not None else Allocator.from_recipe(graph, cost, config)
        self.full = self.alloc.full_cost
        self.history: list[dict] = []
        self.steps = 0  # optimizer steps seen by after_step
        self.since_update = 0  # importance steps since the last mask update
        self.last_progress = 0.0  # ramp progress of the last mask update
        self.masked_any = False  # something is masked
        self.bn_stale = False  # the masks changed since the batch norms' running statistics were estimated
        self._importance_now = False  # before_step of this step scored the gradients
        self.finalized = False  # finalize() removed the masks from the model
        self._self_counted = False  # the current after_step follows the pruner's own schedule
        self.target: dict | None = None  # the target's description (set by smcp_core.api.pruner)
        # called as ``on_window_end(pruner, epoch)`` after the self-counted window's last update: the
        # Python API's closed loop (``smcp prune`` runs its own, per epoch)
        self.on_window_end: Callable[[Pruner, int], None] | None = None

    # ------------------------------------------------------------------ state
    def to(self, device: torch.device | str) -> Pruner:
        """Move the pruner's own tensors (mask bank, labels, importance) to ``device``; call it after
        moving the model (a Lightning strategy, ``model.cuda()``)."""
        self.device = torch.device(device)
        self.masker.to(self.device)
        self.tracker.to(self.device)
        self.bn_scaler.to(self.device)
        return self

    def keep(self) -> torch.Tensor:
        """The current keep-mask over the graph's channel classes (bool, CPU)."""
        return self.masker.keep().cpu()

    @property
    def prunes(self) -> bool:
        """Whether the target is below the full model's cost (else nothing is ever masked)."""
        return self.target_cost < self.full

    @property
    def frozen(self) -> bool:
        """Self-counted loop: the pruning window is over (masks no longer change)."""
        return self.schedule is not None and self.steps >= self.schedule.end

    def state_dict(self, *, history: bool = True) -> dict:
        """What a checkpoint needs to continue: masks, importance, BN scales, counters, budget (and
        with ``history`` the mask-update rows)."""
        state = {"mask": self.masker.class_mask.detach().cpu(), "importance": self.tracker.state_dict(),
                 "bn_scales": self.bn_scaler.scales() or None, "since_update": self.since_update,
                 "last_progress": self.last_progress, "bn_stale": self.bn_stale, "steps": self.steps,
                 "target_cost": self.target_cost, "n_classes": self.graph.n_classes,
                 "calibration": [self.cost.scale, self.cost.removed_cost]}  # the closed loop re-fits it
        if history:
            state["pruner_history"] = list(self.history)
        return state

    def load_state_dict(self, state: dict, *, history: bool = True, budget: bool = True) -> None:
        """Continue from :meth:`state_dict` (or a ``smcp prune`` checkpoint, which holds the same
        keys); ``budget=False`` keeps this pruner's ``target_cost``."""
        if state.get("n_classes", self.graph.n_classes) != self.graph.n_classes:
            raise SmcpError(f"pruner state was made for a model with {state.get('n_classes')} channel classes, "
                            f"this one has {self.graph.n_classes}; load the state of the same model")
        self.masker.set_keep(state["mask"])
        self.tracker.load_state_dict(state["importance"])
        if state.get("bn_scales") is not None and self.bn_scaler.items:
            for (bn, _), sc in zip(self.bn_scaler.items, state["bn_scales"]):
                bn.parametrizations.weight[0].s.fill_(float(sc))
        self.since_update = int(state.get("since_update", 0))
        self.last_progress = float(state.get("last_progress", 0.0))
        self.bn_stale = bool(state.get("bn_stale", True))  # (older checkpoints: recalibrate to be safe)
        self.steps = int(state.get("steps", 0))
        if budget:  # (smcp prune restores budget and calibration from its history instead)
            self.target_cost = float(state.get("target_cost", self.target_cost))
            if state.get("calibration") is not None:
                self.cost.scale, self.cost.removed_cost = (float(v) for v in state["calibration"])
        self.masked_any = not bool(self.masker.keep().all())
        if history and "pruner_history" in state:
            self.history[:] = list(state["pruner_history"])

    # ------------------------------------------------------------------ one optimizer step
    def before_step(self, importance: bool | None = None) -> None:
        """After ``loss.backward()`` (and AMP unscaling), before ``optimizer.step()``: score the
        gradients when ``importance`` (default: inside the schedule's pruning window), and add the
        pruned decay to the masked weights' gradients."""
        self._need_live("before_step")
        if importance is None:
            self._need_schedule("before_step")
            importance = self.prunes and self.schedule.in_window(self.steps + 1)
        self._importance_now = bool(importance) and not self.method.soft_filter
        if self._importance_now:
            self.tracker.update()
        self.masker.apply_pruned_decay(self.pc.pruned_decay)

    def after_step(self, progress: float | None = None, epoch: int | None = None) -> dict | None:
        """After ``optimizer.step()``: pruned weights re-zeroed where the method holds them at zero,
        and a mask update once ``update_every`` scored steps have passed (at the ramp ``progress``,
        default: the schedule's), plus the update at the target when the self-counted window ends.
        Returns the update's history row, or None."""
        self._need_live("after_step")
        self._need_schedule("after_step")
        self.steps += 1
        self._self_counted = progress is None
        if self.method.rezero and self.masker.mode == "permanent" and self.masked_any:
            methods.rezero_pruned_(self.masker)  # pruned weights stay exactly zero (HALP re-zeroes every step)
        if self.zero_weights is not None:
            self.zero_weights()  # unstructured: the zeroed weights stay zero
        row = None
        if self._importance_now:
            self.since_update += 1
            if self.since_update >= self.schedule.update_every:
                row = self.update_masks(self.schedule.progress(self.steps) if progress is None else progress, epoch)
        if progress is None and self.steps == self.schedule.end and self.prunes:
            row = self.finish_window(epoch) or row
            if self.on_window_end is not None:  # e.g. measured and corrected: the rest of training fine-tunes it
                self.on_window_end(self, epoch or 0)
        self._importance_now = False
        return row

    def finish_window(self, epoch: int | None = None) -> dict | None:
        """The pruning window's last update, always at the full target (unless the last one was)."""
        if self.last_progress < 1.0 or self.since_update > 0:
            return self.update_masks(1.0, epoch)
        return None

    def enforce_target(self, epoch: int | None = None) -> dict | None:
        """One update at the target when the masks are above it (training ended inside the window,
        or a resumed run's target changed); returns its row, or None."""
        if self.prunes and self.cost.total(self.keep()) > self.target_cost * (1 + 1e-9):
            return self.update_masks(1.0, epoch)
        return None

    def _need_live(self, what: str) -> None:
        if self.finalized:
            raise SmcpError(f"Pruner.{what}(): the pruner was finalized (api.slim / finalize); its masks are baked "
                            "into the model and can no longer change")

    def _need_schedule(self, what: str) -> None:
        if self.schedule is None:
            raise SmcpError(f"Pruner.{what}() needs a schedule: create the pruner with "
                            "schedule=StepSchedule(warmup=..., ramp=..., update_every=...)")

    # ------------------------------------------------------------------ mask updates
    def apply_keep(self, keep: torch.Tensor, scores: torch.Tensor) -> None:
        """Install a keep-mask chosen from the (all-reduced) ``scores``: masks, SFP's zeroed filters,
        BN rescaling, and a new importance window."""
        self.masker.set_keep(keep)
        self.masked_any = not bool(keep.all())
        self.bn_stale = True
        if self.method.soft_filter:  # SFP's final selection: producers' filters zeroed too, then masked
            methods.zero_filters_(self.masker, keep)
        self.bn_scaler.update(keep, scores)
        self.tracker.reset()

    def update_masks(self, progress: float, epoch: int | None = None, *, record: bool = True) -> dict:
        """Solve the masks for the budget at ``progress`` and install them; returns the history row
        (appended to :attr:`history` unless ``record`` is false: the closed loop appends its own row
        first).  Resets the update counter and records ``progress`` as the last update's."""
        self._need_live("update_masks")
        solved = self._solve(progress, epoch, self._allocate)
        dt = time.perf_counter() - solved.t0
        self.apply_keep(solved.keep, solved.scores)
        row = solved.row
        row["solve_ms"] = 1000 * dt
        if solved.result.fraction is not None:
            row["fraction"] = solved.result.fraction
        self.since_update = 0
        self.last_progress = progress
        self._emit(row, record)
        return row

    def sfp_step(self, progress: float, epoch: int | None = None) -> dict:
        """SFP at the end of a pruning-window epoch: zero the producers' output filters of the
        lowest-L2 classes at the uniform fraction for the scheduled budget; no masks."""
        solved = self._solve(progress, epoch, self.alloc.solve_uniform, soft_filter=True)
        zeroed = methods.zero_filters_(self.masker, solved.keep)
        self.bn_stale = True  # zeroed filters change the forward pass like a mask
        row = solved.row
        row.update(zeroed_filters=zeroed, fraction=solved.result.fraction,
                   solve_ms=1000 * (time.perf_counter() - solved.t0))
        self.last_progress = progress
        self._emit(row, True)
        return row

    def record(self, row: dict) -> None:
        """Append ``row`` to the history and report it."""
        self._emit(row, True)

    def _emit(self, row: dict, record: bool) -> None:
        if record:
            self.history.append(row)
        self.rep.metrics(row)

    def _solve(self, progress: float, epoch: int | None, solve: Callable[[torch.Tensor, float], SolveResult], *,
               soft_filter: bool = False) -> _Solved:
        """The sequence every mask update shares: the scheduled budget at ``progress``, the scores
        all-reduced over ranks, ``solve(scores, budget)``, its keep-mask broadcast from rank 0, and
        the common fields of the ``mask_update`` history row."""
        budget = budget_at(progress, self.full, self.target_cost, self.pc.schedule)
        t0 = time.perf_counter()
        scores = dist.all_reduce_mean_(self.tracker.scores().detach().clone())  # identical on every rank
        res = _solve_on_main(solve, scores, budget)
        keep = res.keep.cpu().bool()
        row = {"event": "mask_update", **({"soft_filter": True} if soft_filter else {}),
               "epoch": epoch if epoch is not None else 0, **({"step": self.steps} if self._self_counted else {}),
               "progress": round(progress, 4), "budget": budget, "cost": res.cost,
               "predicted": self.cost.calibrated(res.cost), "kept_classes": int(keep.sum())}
        return _Solved(keep, scores, res, row, t0)

    def _allocate(self, scores: torch.Tensor, budget: float) -> SolveResult:
        """The method's allocation: SMCP's knapsack, or the method's (uniform, monotone) variant."""
        if self.method.name == "smcp":
            return self.alloc.solve(scores, budget, self.masker.keep())
        return methods.allocate(self.alloc, self.method, scores, budget, self.masker.keep().cpu())

    # ------------------------------------------------------------------ the end
    def finalize(self) -> None:
        """The end of pruning: the BN scales baked in, the masks multiplied into the weights and the
        parametrisations removed, so that ``model`` is the plain masked model that
        :func:`~smcp_core.slim.surgery.slim_submodule` slims (its outputs are the slim model's).  The
        pruner can do nothing more after this."""
        self.bn_scaler.bake()
        self.masker.remove(bake=True)
        self.finalized = True

    def bake_state_dict(self) -> dict[str, torch.Tensor]:
        """Bake the BN scales into plain parameters (BN rescaling ends) and return the model's dense
        weights with the masks applied (CPU copies): what ``smcp prune`` saves.  Once, at the end."""
        self.bn_scaler.bake()  # gamma_orig * s into plain parameters before the weights are handed over
        return {k: v.detach().cpu().clone() for k, v in masked_state_dict(self.model, self.masker).items()}


def _solve_on_main(solve: Callable[[torch.Tensor, float], SolveResult], scores: torch.Tensor,
                   budget: float) -> SolveResult:
    """``solve(scores, budget)`` on rank 0 only, its result (or its error) broadcast to every rank."""
    if not dist.active():
        return solve(scores, budget)
    payload: object = None
    error: Exception | None = None
    if dist.is_main():
        try:
            payload = solve(scores, budget)
        except Exception as exc:  # noqa: BLE001 - every rank must leave the broadcast with the same outcome
            error = exc
            payload = (type(exc).__name__, str(exc))
    payload = dist.broadcast_object(payload, src=0)
    if error is not None:
        raise error
    if isinstance(payload, tuple):  # rank 0 failed: the same line here
        kind, msg = payload
        raise InfeasibleTarget(msg) if kind == "InfeasibleTarget" else SmcpError(f"mask update on rank 0: {msg}")
    return payload
