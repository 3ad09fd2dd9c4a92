"""Exact multiple-choice knapsack (MCKP) with real-valued costs.

The pruning step of SMCP has to pick one width per prunable channel group so that the summed
importance of the kept channels is as large as possible while the summed latency stays within a
budget.  That is a *multiple-choice knapsack*: ``G`` groups, each with a short list of options
``(cost, value)``, pick exactly one option per group, maximise the total value subject to the total
cost being at most ``capacity``.  Costs are measured latencies (real numbers, not integers), so the
textbook dynamic programme over an integer capacity axis does not apply without rounding; this module
solves the problem exactly instead.

How :func:`solve_mckp` works
----------------------------
1. **Clean each group.**  An option that costs at least as much as another option of the same group
   while being worth no more can never be part of a unique improvement, so every group is reduced to
   its own *Pareto set*: options sorted by strictly increasing cost *and* strictly increasing value.
   (The original option indices are remembered for the answer.)

2. **Relax.**  If a group may be a convex mixture of its options (the LP relaxation), only the
   *upper concave hull* of its Pareto points matters.  The hull, walked from its cheapest point, is a
   chain of segments with decreasing slope (value per unit cost).  For any set of groups the best LP
   value at a budget ``b`` is: the value of every group's cheapest point, plus the segments of all
   those groups taken greedily in order of decreasing slope until the budget ``b`` (minus the
   groups' minimum costs) is used up, the last one partially.  That is a concave piecewise-linear
   function of ``b``; it is tabulated once per suffix of groups and evaluated for many budgets at
   once with :func:`numpy.interp`.  It is an *upper bound* on what those groups can add.

3. **A feasible solution first.**  Take the greedy LP fill but stop before the first segment that does
   not fit (so every group sits on one of its hull points).  Then repeatedly make the single option
   change, over all groups and options, that gains the most value and still fits the leftover budget.
   The value of this solution is a *lower bound* ``LB`` on the optimum.

4. **Exact search over Pareto frontiers.**  Groups are added one at a time.  After ``t`` groups the
   state is a *frontier*: a list of partial solutions ``(cost, value)`` sorted by cost with strictly
   increasing value -- a partial solution that costs at least as much as another and is worth no more
   is dominated: any completion of it is also a completion of the other one, with no more value.
   Adding a group forms every (frontier entry, option) pair at once as a 2-D array sum.  A pair is
   dropped when

   * it cannot be completed within the budget, even with every remaining group at its cheapest
     option, or
   * its value plus the LP bound of the remaining groups at the leftover budget is below ``LB``
     (minus a tiny tolerance): no completion of it can beat the solution already in hand.

   The survivors are sorted by cost (a stable sort over already-sorted runs, which is cheap) and
   reduced to the Pareto frontier again.  For each surviving entry the index of its parent entry and
   the option taken are stored so the choice can be reconstructed at the end.  Since the optimal
   solution is never dominated and never pruned by the bound, the best entry of the last frontier is
   the optimum.

All work inside a group is vectorised with numpy; Python only loops over groups (and over the few
passes needed to peel non-concave points off each group's hull).  Inputs may be torch tensors on any
device, numpy arrays or lists; the computation runs in float64 on the CPU.

The feasibility test uses ``total cost <= capacity + 1e-9 * |capacity|`` so that float round-off in
summing latencies cannot make a budget that is met "exactly" look infeasible.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Sequence

import numpy as np
import torch

from .errors import InfeasibleTarget

__all__ = ["McKpResult", "solve_mckp", "REL_TOL"]

#: Relative tolerance on the capacity (float round-off in summed costs).
REL_TOL = 1e-9


@dataclass(frozen=True)
class McKpResult:
    """Solution of a multiple-choice knapsack.

    ``choice[g]`` is the index of the option chosen in group ``g`` (into the caller's original option
    list); ``value`` and ``cost`` are the totals of the chosen options.  ``max_frontier`` is a
    diagnostic: the largest number of partial solutions kept at any step of the search.
    """

    choice: torch.Tensor
    value: float
    cost: float
    max_frontier: int = field(default=0, compare=False)


# --------------------------------------------------------------------------------------------------
# input handling


def _as_vector(x, what: str, g: int) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        arr = x.detach().to(device="cpu", dtype=torch.float64).numpy()
    else:
        arr = np.asarray(x, dtype=np.float64)
    if arr.ndim != 1:
        raise ValueError(f"{what}[{g}] must be 1-D, got shape {tuple(arr.shape)}")
    if arr.size == 0:
        raise ValueError(f"{what}[{g}] is empty: every group needs at least one option")
    if not np.all(np.isfinite(arr)):
        raise ValueError(f"{what}[{g}] contains a non-finite number")
    return arr


# --------------------------------------------------------------------------------------------------
# per-group preprocessing


def _pareto_group(c: np.ndarray, v: np.ndarray) -> np.ndarray:
    """Indices of the group's Pareto options, ordered by strictly increasing cost and value."""
    order = np.lexsort((-v, c))  # cost ascending, the best value first among equal costs
    vs = v[order]
    keep = np.ones(vs.size, dtype=bool)
    if vs.size > 1:
        keep[1:] = vs[1:] > np.maximum.accumulate(vs)[:-1]
    return order[keep]


def _upper_hull(c: np.ndarray, v: np.ndarray) -> np.ndarray:
    """Vertex indices of the upper concave hull of points with strictly increasing ``c`` and ``v``.

    A point that lies on or below the chord between its two neighbours is not a hull vertex, whatever
    else is removed, so all such points are dropped at once; the pass repeats until none is left.
    """
    idx = np.arange(c.size)
    while idx.size > 2:
        cc, vv = c[idx], v[idx]
        dc, dv = np.diff(cc), np.diff(vv)
        # point i (interior) is kept when slope(i-1, i) > slope(i, i+1)
        inner = dv[:-1] * dc[1:] > dv[1:] * dc[:-1]
        if inner.all():
            break
        keep = np.ones(idx.size, dtype=bool)
        keep[1:-1] = inner
        idx = idx[keep]
    return idx


def _lp_table(dc: np.ndarray, dv: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Breakpoints of the LP-relaxation gain as a function of the budget above the minimum cost.

    ``dc``/``dv`` are hull segments already sorted by decreasing slope.
    """
    xp = np.empty(dc.size + 1)
    fp = np.empty(dv.size + 1)
    xp[0] = 0.0
    fp[0] = 0.0
    np.cumsum(dc, out=xp[1:])
    np.cumsum(dv, out=fp[1:])
    return xp, fp


# --------------------------------------------------------------------------------------------------
# solver


def _infeasible_message(min_cost: float, capacity: float, unit: str) -> str:
    u = f" {unit}" if unit else ""
    return (
        f"latency budget {capacity:.6g}{u} is below the minimum reachable {min_cost:.6g}{u} "
        "(every prunable group at its smallest option); raise the latency target or allow smaller widths"
    )


def solve_mckp(
    values: Sequence,
    costs: Sequence,
    capacity: float,
    *,
    unit: str = "",
) -> McKpResult:
    """Solve a multiple-choice knapsack exactly.

    Args:
        values: one 1-D sequence per group (torch tensor of any float dtype/device, numpy array or
            list); ``values[g][j]`` is the value of option ``j`` of group ``g``.  Any finite floats.
        costs: same shapes as ``values``; finite real costs (normally ``>= 0``, e.g. milliseconds).
        capacity: the budget; the chosen options must cost at most ``capacity`` (up to a relative
            round-off tolerance of :data:`REL_TOL`).  ``math.inf`` means unconstrained.
        unit: unit of the costs, used only in the error message (e.g. ``"ms"``).

    Returns:
        :class:`McKpResult` with one chosen option index per group.  With ties any optimum is returned.

    Raises:
        InfeasibleTarget: even the cheapest option of every group together exceeds ``capacity``.
        ValueError: malformed input (mismatched lengths, empty groups, NaN/inf entries, NaN capacity).
    """
    if len(values) != len(costs):
        raise ValueError(f"values has {len(values)} groups but costs has {len(costs)}")
    capacity = float(capacity)
    if math.isnan(capacity):
        raise ValueError("capacity is NaN")
    n_groups = len(values)
    vals = [_as_vector(values[g], "values", g) for g in range(n_groups)]
    csts = [_as_vector(costs[g], "costs", g) for g in range(n_groups)]
    for g in range(n_groups):
        if vals[g].size != csts[g].size:
            raise ValueError(
                f"group {g}: values has {vals[g].size} options but costs has {csts[g].size}"
            )

    cap = capacity + REL_TOL * abs(capacity) if math.isfinite(capacity) else capacity
    min_total = float(sum(c.min() for c in csts)) if n_groups else 0.0
    if min_total > cap:
        raise InfeasibleTarget(_infeasible_message(min_total, capacity, unit))

    def finish(choice: np.ndarray, max_frontier: int = 0) -> McKpResult:
        value = float(sum(vals[g][choice[g]] for g in range(n_groups)))
        cost = float(sum(csts[g][choice[g]] for g in range(n_groups)))
        return McKpResult(torch.as_tensor(choice, dtype=torch.long), value, cost, max_frontier)

    if n_groups == 0:
        return finish(np.zeros(0, dtype=np.int64))
    if math.isinf(capacity):  # +inf: unconstrained
        return finish(np.array([int(np.argmax(v)) for v in vals], dtype=np.int64))

    # 1. Pareto options per group (sorted by cost; strictly increasing cost and value).
    p_idx = [_pareto_group(csts[g], vals[g]) for g in range(n_groups)]
    p_c = [csts[g][p_idx[g]] for g in range(n_groups)]
    p_v = [vals[g][p_idx[g]] for g in range(n_groups)]
    min_c = np.array([pc[0] for pc in p_c])
    base_v = np.array([pv[0] for pv in p_v])
    n_opt = np.array([pc.size for pc in p_c])

    # 2. Hull segments of every group, sorted globally by decreasing slope.
    seg_dc, seg_dv, seg_g, seg_h = [], [], [], []
    hull_to_pareto = []
    for g in range(n_groups):
        h = _upper_hull(p_c[g], p_v[g])
        hull_to_pareto.append(h)
        if h.size > 1:
            seg_dc.append(np.diff(p_c[g][h]))
            seg_dv.append(np.diff(p_v[g][h]))
            seg_g.append(np.full(h.size - 1, g))
            seg_h.append(np.arange(h.size - 1))
    if seg_dc:
        seg_dc = np.concatenate(seg_dc)
        seg_dv = np.concatenate(seg_dv)
        seg_g = np.concatenate(seg_g)
        seg_h = np.concatenate(seg_h)
        # decreasing slope; within a group the hull order is kept (its slopes strictly decrease)
        order = np.lexsort((seg_h, seg_g, -(seg_dv / seg_dc)))
        seg_dc, seg_dv, seg_g = seg_dc[order], seg_dv[order], seg_g[order]
    else:
        seg_dc = seg_dv = np.zeros(0)
        seg_g = np.zeros(0, dtype=np.int64)

    # Trivial case: every group's best option fits.
    if float(sum(pc[-1] for pc in p_c)) <= cap:
        return finish(np.array([p_idx[g][-1] for g in range(n_groups)], dtype=np.int64))

    # 3. Lower bound: greedy LP fill rounded down, then best single-option improvements.
    cur = _greedy_feasible(p_c, p_v, hull_to_pareto, seg_dc, seg_g, min_c, cap)
    lb = float(sum(p_v[g][cur[g]] for g in range(n_groups)))
    lb_choice = np.array([p_idx[g][cur[g]] for g in range(n_groups)], dtype=np.int64)

    # 4. Frontier search.  Groups with the fewest options first keeps early frontiers small.
    perm = np.argsort(n_opt, kind="stable")
    rank = np.empty(n_groups, dtype=np.int64)
    rank[perm] = np.arange(n_groups)
    seg_rank = rank[seg_g]
    # suffix sums over the processing order: what the groups still to come contribute at minimum
    min_after = np.concatenate([np.cumsum(min_c[perm][::-1])[::-1][1:], [0.0]])
    base_after = np.concatenate([np.cumsum(base_v[perm][::-1])[::-1][1:], [0.0]])
    scale = float(sum(np.abs(pv).max() for pv in p_v))
    eps = 1e-9 * max(scale, 1e-300) + 1e-12 * abs(lb)

    front_c = np.zeros(1)
    front_v = np.zeros(1)
    parents: list[np.ndarray] = []
    options: list[np.ndarray] = []
    max_front = 1
    for t, g in enumerate(perm):
        c, v = p_c[g], p_v[g]
        f = front_c.size
        # rows = options, columns = frontier entries: each row is sorted by cost
        cand_c = (c[:, None] + front_c[None, :]).ravel()
        cand_v = (v[:, None] + front_v[None, :]).ravel()
        slack = cap - min_after[t] - cand_c
        ok = slack >= 0.0
        if t + 1 < n_groups:
            xp, fp = _lp_table(seg_dc[seg_rank > t], seg_dv[seg_rank > t])
            bound = cand_v + base_after[t] + np.interp(np.maximum(slack, 0.0), xp, fp)
        else:
            bound = cand_v
        ok &= bound >= lb - eps
        sel = np.flatnonzero(ok)
        if sel.size == 0:
            # only reachable through float round-off: the greedy solution is optimal
            return finish(lb_choice, max_front)
        sc = cand_c[sel]
        order = np.argsort(sc, kind="stable")  # timsort: merges the sorted runs
        sel = sel[order]
        sc = sc[order]
        sv = cand_v[sel]
        keep = np.ones(sel.size, dtype=bool)
        if sel.size > 1:
            keep[1:] = sv[1:] > np.maximum.accumulate(sv)[:-1]
        sel, sc, sv = sel[keep], sc[keep], sv[keep]
        if sel.size > 1:  # equal costs: the later entry has the larger value
            dup = np.zeros(sel.size, dtype=bool)
            dup[:-1] = sc[:-1] == sc[1:]
            if dup.any():
                sel, sc, sv = sel[~dup], sc[~dup], sv[~dup]
        parents.append(sel % f)
        options.append(sel // f)
        front_c, front_v = sc, sv
        max_front = max(max_front, int(sel.size))

    # Reconstruct the best final entry (the last one: values increase along the frontier).
    choice = np.empty(n_groups, dtype=np.int64)
    i = front_c.size - 1
    for t in range(n_groups - 1, -1, -1):
        g = perm[t]
        choice[g] = p_idx[g][options[t][i]]
        i = parents[t][i]
    if front_v[-1] < lb:  # cannot happen except through round-off
        choice = lb_choice
    return finish(choice, max_front)


def _greedy_feasible(p_c, p_v, hull_to_pareto, seg_dc, seg_g, min_c, cap) -> np.ndarray:
    """A good feasible choice (indices into each group's Pareto list) for the lower bound."""
    n_groups = len(p_c)
    residual = cap - float(min_c.sum())
    taken = np.cumsum(seg_dc) <= residual
    # keep only the prefix that fits (stop at the first segment that does not)
    n_take = int(np.argmin(taken)) if not taken.all() else taken.size
    steps = np.bincount(seg_g[:n_take], minlength=n_groups)
    cur = np.array([hull_to_pareto[g][steps[g]] for g in range(n_groups)], dtype=np.int64)

    # improvement: repeatedly apply the single option change with the largest gain that fits
    flat_c = np.concatenate(p_c)
    flat_v = np.concatenate(p_v)
    flat_g = np.repeat(np.arange(n_groups), [pc.size for pc in p_c])
    offsets = np.concatenate([[0], np.cumsum([pc.size for pc in p_c])[:-1]])
    for _ in range(4 * n_groups + 10):
        cur_flat = offsets + cur
        residual = cap - float(flat_c[cur_flat].sum())
        gain = flat_v - flat_v[cur_flat][flat_g]
        fits = flat_c - flat_c[cur_flat][flat_g] <= residual
        gain = np.where(fits, gain, -np.inf)
        k = int(np.argmax(gain))
        if not gain[k] > 0.0:
            break
        g = int(flat_g[k])
        cur[g] = k - offsets[g]
    return cur
