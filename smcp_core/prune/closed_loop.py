"""The latency closed loop: measure the slimmed model at the end of the pruning window and correct
the masks until the measurement (not the table's prediction) meets the target (``prune.closed_loop``).

:class:`ClosedLoop` works on a :class:`~smcp_core.prune.pruner.Pruner` (its masks, cost model,
budget and history), so ``smcp prune`` and a loop of the user's own (:mod:`smcp_core.api`) share it.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from smcp_core.errors import InfeasibleTarget, SmcpError
from smcp_core.profile.calibration import fit_calibration
from smcp_core.prune.pruner import Pruner
from smcp_core.utils import dist


@dataclass
class LatencyCheck:
    """Closed-loop check of the latency target at the end of the pruning window (``prune.closed_loop``).

    ``measure(keep) -> (dense_ms, slim_ms, slim_slow_ms)`` times the dense model and the model
    slimmed to ``keep`` in paired rounds on the profile backend; ``slim_ms / dense_ms`` (the median
    per-round ratio), times ``baseline_ms`` (the table's dense latency), is the measured latency in
    the table's units, ``slim_slow_ms`` the slow end of its confidence interval.  When that slow end
    is above ``target_ms`` (a miss, or too close to call: the export gate might not pass it), or the
    median is more than ``overshoot`` below ``aim_ms`` while a later round can check the result
    (pruned deeper than asked, which costs accuracy), the measured point joins the calibration
    ``points`` (``(layer_sum, removed_layers, measured_ms)``), the calibration is re-fitted and the
    masks are re-solved for ``aim_ms`` (corrected: :meth:`ClosedLoop._corrected_aim`).  If the last
    measurement misses the target, the masks of the slowest measured round that met it are restored."""

    measure: Callable[[torch.Tensor], tuple[float, float, float]]
    baseline_ms: float
    target_ms: float
    aim_ms: float
    points: list = field(default_factory=list)
    rounds: int = 2
    overshoot: float = 0.1
    relax_hint: str = "raise prune.closed_loop or prune.target_margin"  # what to change when it still misses


class ClosedLoop:
    """One run of the closed loop on ``pruner`` with ``check`` (see :class:`LatencyCheck`)."""

    def __init__(self, pruner: Pruner, check: LatencyCheck) -> None:
        self.pruner = pruner
        self.check = check

    def run(self, epoch: int) -> None:
        """Measure the slim model at the current masks; while it misses the target (or lands far
        below the aim with a round left to check a correction), add the point to the calibration,
        re-fit it and re-solve at the aim (:class:`LatencyCheck`); once one round missed and another
        met it, the budget is interpolated between the two (:meth:`_bracketed_budget`)."""
        chk, cost = self.check, self.pruner.cost
        best = None  # the slowest measured state that met the target: (measured, round, keep, calibration, budget)
        measured_rounds: list[tuple[torch.Tensor, float, float]] = []  # per round: (keep, median ms, slow end ms)
        for rnd in range(chk.rounds + 1):
            keep = self.pruner.masker.keep().cpu()
            dense_ms, slim_ms, slim_slow_ms = self._measure(keep)
            measured = slim_ms / dense_ms * chk.baseline_ms
            slow_end = slim_slow_ms / dense_ms * chk.baseline_ms
            n_removed = self.pruner.graph.removed_layers(keep)
            free_sum = cost.total(keep) - cost.removed_cost * n_removed
            met = slow_end <= chk.target_ms  # as the export gate decides: the whole interval meets it
            # a correction upwards is measured again in the next round; SFP's zeroed filters cannot return
            over = (met and measured < chk.aim_ms * (1 - chk.overshoot) and rnd < chk.rounds
                    and not self.pruner.method.soft_filter)
            row = {"event": "closed_loop", "epoch": epoch, "round": rnd, "predicted_ms": cost.predict(keep),
                   "measured_ms": measured, "measured_slow_ms": slow_end, "dense_ms": dense_ms, "slim_ms": slim_ms,
                   "target_ms": chk.target_ms, "met": met}
            measured_rounds.append((keep.clone(), measured, slow_end))
            if met and (best is None or measured > best[0]):
                best = (measured, rnd, keep.clone(), (cost.scale, cost.removed_cost), self.pruner.target_cost)
            if (met and not over) or rnd == chk.rounds:
                self._closed_loop_done(row, measured, met, best)
                return
            if not self._recalibrate(epoch, row, (free_sum, n_removed, measured), over, measured_rounds):
                return

    def _measure(self, keep: torch.Tensor) -> tuple[float, float, float]:
        """``(dense_ms, slim_ms, slim_slow_ms)`` measured on rank 0 and broadcast; a failure stops every rank."""
        vals = torch.zeros(3, dtype=torch.float64)
        failure = None
        if dist.is_main():
            try:
                vals = torch.tensor(self.check.measure(keep), dtype=torch.float64)
            except SmcpError as exc:  # every rank must hear of it, not wait in the broadcast
                failure, vals = exc, torch.full((3,), float("nan"), dtype=torch.float64)
        dense_ms, slim_ms, slim_slow_ms = (float(v) for v in dist.broadcast_(vals.to(self.pruner.device)).cpu())
        if failure is not None or not (math.isfinite(dense_ms) and math.isfinite(slim_ms)):
            raise SmcpError("closed loop: measuring the slimmed model failed"
                            + (f": {failure}" if failure is not None else " on rank 0")) from None
        return dense_ms, slim_ms, slim_slow_ms

    def _closed_loop_done(self, row: dict, measured: float, met: bool, best: tuple | None) -> None:
        """The loop's last round: a miss restores the slowest measured state that met the target
        (if any) or says so; the row is recorded."""
        chk, cost = self.check, self.pruner.cost
        if not met and best is not None:  # a correction made it worse: back to what was measured good
            _, brnd, bkeep, (cost.scale, cost.removed_cost), self.pruner.target_cost = best
            self.pruner.apply_keep(bkeep, dist.all_reduce_mean_(self.pruner.tracker.scores().detach().clone()))
            row.update(reverted_to_round=brnd, scale=cost.scale, removed_layer_ms=cost.removed_cost,
                       budget=self.pruner.target_cost)
            self.pruner.rep.log(f"closed loop: {measured:.4g} ms misses the target {chk.target_ms:.4g} ms; "
                                f"restored the masks of round {brnd} (measured {best[0]:.4g} ms)")
        elif not met:
            self.pruner.rep.log(f"closed loop: still {measured:.4g} ms > target {chk.target_ms:.4g} ms after "
                                f"{chk.rounds} corrections; {chk.relax_hint}")
        self.pruner.record(row)

    def _corrected_aim(self, row: dict) -> float:
        """The predicted latency to re-solve for: the aim, lowered where the measured interval is so
        wide that its slow end (``measured_slow_ms``) would pass the target with the median at the aim,
        then divided by what the re-fitted calibration still under-predicts at the current masks
        (measured / predicted, when above 1): a local correction, since the next masks are near these.
        It only ever tightens: giving capacity back (an overshoot) trusts the re-fitted calibration,
        so a correction cannot jump past the target."""
        chk = self.check
        measured, slow = row["measured_ms"], row["measured_slow_ms"]
        aim = chk.aim_ms
        if math.isfinite(slow) and slow > measured > 0:
            aim = min(aim, chk.target_ms * measured / slow)
        predicted = self.pruner.cost.predict(self.pruner.masker.keep().cpu())
        return aim * min(1.0, predicted / measured) if predicted > 0 and measured > 0 else aim

    def _bracketed_budget(self, solve_for: float, measured_rounds: list) -> tuple[float, str]:
        """The layer-sum budget for the next round.  Once a measured structure missed the target (the
        dense model always does) and another met it, the budget is interpolated (regula falsi)
        between the two closest structures' costs (under the current cost model) to where their
        measured medians reach the aim, less the measured interval's width: measured structures
        bracket the answer, which a global re-fit of the table (``solve_for``, used until a round
        meets the target) does not.  ``measured_rounds``: ``(keep, median ms, slow end ms)`` so far."""
        chk, cost = self.check, self.pruner.cost
        dense = (self.pruner.graph.full_keep(), chk.baseline_ms, chk.baseline_ms)  # measured too: the ratio 1
        rounds = [dense, *measured_rounds]
        misses = [r for r in rounds if r[2] > chk.target_ms]
        fast = [r for r in rounds if r[2] <= chk.target_ms]
        refit = cost.budget_for(solve_for), f"re-solving for {solve_for:.4g} ms predicted"
        if not misses or not fast:
            return refit
        (k_hi, m_hi, s_hi), (k_lo, m_lo, s_lo) = min(misses, key=lambda r: r[1]), max(fast, key=lambda r: r[1])
        width = max([s / m for m, s in ((m_hi, s_hi), (m_lo, s_lo)) if m > 0 and math.isfinite(s)], default=1.0)
        goal = min(chk.aim_ms, chk.target_ms / width)
        c_hi, c_lo = cost.total(k_hi), cost.total(k_lo)
        if not (m_hi > m_lo and c_hi > c_lo):
            return refit
        frac = min(1.0, max(0.0, (goal - m_lo) / (m_hi - m_lo)))
        return c_lo + frac * (c_hi - c_lo), f"interpolating between the rounds measured at {m_lo:.4g} and {m_hi:.4g} ms"

    def _recalibrate(self, epoch: int, row: dict, point: tuple[float, int, float], over: bool,
                     measured_rounds: list) -> bool:
        """Add the measured ``point`` to the calibration, re-fit it and re-solve the masks at the aim.
        Returns False (calibration, budget and masks kept) when the re-fitted aim is out of reach."""
        chk, cost = self.check, self.pruner.cost
        prev = (cost.scale, cost.removed_cost, self.pruner.target_cost)
        chk.points.append(point)
        scale, removed = fit_calibration(chk.points)
        cost.scale, cost.removed_cost = scale, removed
        solve_for = self._corrected_aim(row)
        budget, how = self._bracketed_budget(solve_for, measured_rounds)
        measured = point[2]
        what = (f"more than {100 * chk.overshoot:.0f} % below the aim {chk.aim_ms:.4g} ms" if over
                else f"> target {chk.target_ms:.4g} ms")
        self.pruner.rep.log(f"closed loop: measured {measured:.4g} ms {what} (predicted {row['predicted_ms']:.4g}); "
                            f"re-calibrated (scale {scale:.3f}, {removed:.4g} ms per removed layer); {how} "
                            f"(aim {chk.aim_ms:.4g} ms measured)")
        if over:
            row["overshoot"] = True
        self.pruner.target_cost = budget
        try:
            update = self.pruner.update_masks(1.0, epoch, record=False)
        except InfeasibleTarget as exc:  # keep the masks, calibration and budget we have; the run goes on
            cost.scale, cost.removed_cost, self.pruner.target_cost = prev
            row.update(error=str(exc))
            self.pruner.record(row)
            self.pruner.rep.log(f"closed loop: the re-fitted target is out of reach ({exc}); keeping the current masks")
            return False
        row.update(scale=scale, removed_layer_ms=removed, budget=budget)
        self.pruner.record(row)
        self.pruner.history.append(update)
        return True
