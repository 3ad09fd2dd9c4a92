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
   while being worth no more can always be swapped for that other option without losing value or
   breaking the budget, so every group is reduced to its own *Pareto set*: options sorted by strictly
   increasing cost *and* strictly increasing value.  (The original option indices are remembered for
   the answer.)

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

4. **Throw out hopeless options.**  Fixing option ``j`` of group ``g`` and relaxing all other groups
   gives an upper bound on every solution that uses it.  When that bound is below ``LB`` (or the
   other groups cannot fit at all) the option is removed.  With the usual tight LP bounds this leaves
   only a few options per group, around the LP optimum.  Hulls, bounds and ``LB`` are recomputed on the
   smaller sets and the reduction is repeated while it removes anything (a few rounds at most).

5. **Exact search over Pareto frontiers.**  Groups are added one at a time, those with the fewest
   remaining options first.  After ``t`` groups the state is a *frontier*: a list of partial solutions
   ``(cost, value)`` sorted by cost with strictly increasing value -- a partial solution that costs at
   least as much as another and is worth no more is dominated: any completion of it is also a
   completion of the other one, with no more value.  Adding a group forms every (option, frontier
   entry) pair at once as a 2-D array sum.  A pair is dropped when

   * it cannot be completed within the budget, even with every remaining group at its cheapest
     option, or
   * its value plus the LP bound of the remaining groups at the leftover budget is below ``LB``
     (minus a tiny tolerance): no completion of it can beat a solution already in hand.

   Each pair also yields a feasible *completion* for free: give the remaining groups the whole hull
   segments that fit into the leftover budget, in slope order.  The best completion raises ``LB``
   when it is better, which makes the pruning sharper as the search goes on.

   The survivors are sorted by cost (a stable sort over already-sorted runs, which is cheap) and
   reduced to the Pareto frontier again.  For each surviving entry the index of its parent entry and
   the option taken are stored so the choice can be reconstructed at the end.  Since an optimal
   solution is never dominated (a solution with the same cost and value may replace it) and never
   pruned by the bound, the best entry of the last frontier is an optimum.

The problem is NP-hard, so some inputs (e.g. values convex in the cost, where the LP bound is loose)
can take much longer; pruning-shaped inputs (concave values, near-linear costs) keep frontiers of a
few hundred entries.

All work inside a group is vectorised with numpy; Python only loops over groups (and over the few
passes needed to peel non-concave points off each group's hull).  The reduction of step 4 tests every
option of every group at once, and the groups left with a single option (most of them, after it)
are added to the search's first frontier without a step each.  :class:`McKpInstance` does what does
not depend on the capacity (checks, Pareto sets, first hulls and LP tables) once, for callers that
solve one instance at several capacities (the allocator's capacity correction).  Inputs may be torch tensors on any
device, numpy arrays or lists; the computation runs in float64 on the CPU.

The feasibility test uses ``total cost <= capacity + 1e-9 * |capacity|`` so that float round-off in
summing latencies cannot make a budget that is met "exactly" look infeasible.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import NamedTuple

import numpy as np
import torch

from smcp_core.errors import InfeasibleTarget

__all__ = ["McKpInstance", "McKpResult", "lp_upper_bound", "solve_mckp", "REL_TOL"]


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


def _as_vector(x, what: str, g: int) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        t = x.detach()
        if t.dtype != torch.float64 or t.device.type != "cpu":
            t = t.to(device="cpu", dtype=torch.float64)
        arr = t.numpy()
    else:
        arr = np.asarray(x, dtype=np.float64)
    if arr.ndim != 1:
        raise ValueError(f"{what}[{g}] must be 1-D, got shape {tuple(arr.shape)}")
    if arr.size == 0:
        raise ValueError(f"{what}[{g}] is empty: every group needs at least one option")
    if not np.isfinite(arr).all():
        raise ValueError(f"{what}[{g}] contains a non-finite number")
    return arr


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
        dc, dv = cc[1:] - cc[:-1], vv[1:] - vv[:-1]  # np.diff, without its per-call overhead
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


def _infeasible_message(min_cost: float, capacity: float, unit: str) -> str:
    u = f" {unit}" if unit else ""
    return (
        f"cost budget {capacity:.6g}{u} is below the minimum reachable {min_cost:.6g}{u} "
        "(every prunable group at its smallest option); relax the target or allow smaller widths"
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
    return McKpInstance(values, costs).solve(capacity, unit=unit)


class McKpInstance:
    """One knapsack instance (the options of every group), solved for one or more capacities.

    What does not depend on the capacity is done once: the input checks, each group's Pareto set,
    the hull segments of those sets and the per-group LP tables of the first reduction round.  The
    allocator solves the same options at a few corrected capacities in a row.
    """

    def __init__(self, values: Sequence, costs: Sequence, memo: dict | None = None) -> None:
        """``memo`` (optional, the caller's, kept across instances) remembers each group's checked
        options and Pareto set by the identity of its ``values``/``costs`` objects, so instances
        that share most groups' option lists prepare only the groups that differ."""
        if memo is None:
            self.vals, self.csts = _checked_options(values, costs)
            # 1. Pareto options per group (sorted by cost; strictly increasing cost and value).
            self.p_idx = [_pareto_group(c, v) for c, v in zip(self.csts, self.vals)]
        else:
            if len(values) != len(costs):
                raise ValueError(f"values has {len(values)} groups but costs has {len(costs)}")
            prepared = [_prepared_group(memo, values[g], costs[g], g) for g in range(len(values))]
            self.vals, self.csts, self.p_idx = (list(x) for x in zip(*prepared)) if prepared else ([], [], [])
        n_groups = len(self.vals)
        self.min_total = float(sum(c.min() for c in self.csts)) if n_groups else 0.0
        self.p_c = [self.csts[g][self.p_idx[g]] for g in range(n_groups)]
        self.p_v = [self.vals[g][self.p_idx[g]] for g in range(n_groups)]
        self.best_total = float(sum(pc[-1] for pc in self.p_c))
        # Tolerances: ``eps`` on values (bound tests), ``ctol`` on costs for intermediate feasibility
        # tests whose sums are formed in a different order than the final one.
        self.eps = 1e-9 * max(float(sum(np.abs(pv).max() for pv in self.p_v)), 1e-300)
        self.ctol = 1e-12 * float(sum(np.abs(pc).max() for pc in self.p_c))
        self._segs: _Segments | None = None  # built on the first constrained solve

    def solve(self, capacity: float, *, unit: str = "") -> McKpResult:
        """The optimum at ``capacity`` (see :func:`solve_mckp`)."""
        capacity = float(capacity)
        if math.isnan(capacity):
            raise ValueError("capacity is NaN")
        vals, csts = self.vals, self.csts
        n_groups = len(vals)
        cap = capacity + REL_TOL * abs(capacity) if math.isfinite(capacity) else capacity
        if self.min_total > cap:
            raise InfeasibleTarget(_infeasible_message(self.min_total, capacity, unit))
        if n_groups == 0:
            return _result(vals, csts, np.zeros(0, dtype=np.int64))
        if math.isinf(capacity):  # +inf: unconstrained
            return _result(vals, csts, np.array([int(np.argmax(v)) for v in vals], dtype=np.int64))
        # Trivial case: every group's best option fits.
        if self.best_total <= cap:
            return _result(vals, csts, np.array([p[-1] for p in self.p_idx], dtype=np.int64))
        if self._segs is None:
            self._segs = _Segments(self.p_c, self.p_v)
        # 2.-4. LP bounds and a feasible lower bound; then drop options that provably cannot be optimal.
        reduced = _reduce_options(self.p_idx, self.p_c, self.p_v, cap, self.ctol, self.eps, self._segs)
        if reduced.solved:
            return _result(vals, csts, reduced.lb_choice)
        # 5. Frontier search.
        choice, max_front = _FrontierSearch(reduced, cap, self.ctol, self.eps).run()
        return _result(vals, csts, choice, max_front)


def lp_upper_bound(values: Sequence, costs: Sequence, capacity: float, memo: dict | None = None) -> float:
    """An upper bound on the optimum at ``capacity``: the value of the LP relaxation (each group a
    convex mixture of its options), ``-inf`` when even the cheapest options do not fit.  ``memo``:
    as for :class:`McKpInstance` (it also keeps each group's hull)."""
    if len(values) != len(costs):
        raise ValueError(f"values has {len(values)} groups but costs has {len(costs)}")
    memo = {} if memo is None else memo
    hulls = [_hull_of(memo, values[g], costs[g], g) for g in range(len(values))]
    capacity = float(capacity)
    cap = capacity + REL_TOL * abs(capacity)
    min_total = float(sum(h[0] for h in hulls))
    if min_total > cap:
        return -math.inf
    base = float(sum(h[1] for h in hulls))
    if float(sum(h[2] for h in hulls)) <= cap:  # every group's best option fits
        return base + float(sum(h[3] for h in hulls))
    dc, dv, slope = (np.concatenate([h[k] for h in hulls]) for k in (4, 5, 6))
    order = np.argsort(-slope, kind="stable")
    xp, fp = _lp_table(dc[order], dv[order])
    return base + float(np.interp(cap - min_total, xp, fp))


def _hull_of(memo: dict, values, costs, g: int) -> tuple:
    """Group ``g``'s upper hull for :func:`lp_upper_bound`: (cheapest cost, its value, the cost and
    value the hull adds up to, segment cost steps, value steps, slopes), memoised like
    :func:`_prepared_group`."""
    key = ("hull", id(values), id(costs))
    hit = memo.get(key)
    if hit is not None and hit[0] is values and hit[1] is costs:
        return hit[2]
    v, c, p = _prepared_group(memo, values, costs, g)
    pc, pv = c[p], v[p]
    h = _upper_hull(pc, pv) if pc.size > 2 else _SMALL[pc.size]
    hc, hv = pc[h], pv[h]
    dc, dv = hc[1:] - hc[:-1], hv[1:] - hv[:-1]
    out = (float(hc[0]), float(hv[0]), float(hc[-1]), float(hv[-1] - hv[0]), dc, dv, dv / dc)
    memo[key] = (values, costs, out)
    return out


def _checked_options(values: Sequence, costs: Sequence) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """The options of every group as float64 vectors (values, costs); ``ValueError`` for malformed
    input."""
    if len(values) != len(costs):
        raise ValueError(f"values has {len(values)} groups but costs has {len(costs)}")
    n_groups = len(values)
    vals = [_as_vector(values[g], "values", g) for g in range(n_groups)]
    csts = [_as_vector(costs[g], "costs", g) for g in range(n_groups)]
    for g in range(n_groups):
        if vals[g].size != csts[g].size:
            raise ValueError(
                f"group {g}: values has {vals[g].size} options but costs has {csts[g].size}"
            )
    return vals, csts


def _prepared_group(memo: dict, values, costs, g: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Group ``g``'s checked values, costs and Pareto indices, memoised in ``memo`` by the identity
    of ``values``/``costs`` (the entry holds both objects, so their ids stay theirs)."""
    key = (id(values), id(costs))
    hit = memo.get(key)
    if hit is not None and hit[0] is values and hit[1] is costs:
        return hit[2]
    v, c = _as_vector(values, "values", g), _as_vector(costs, "costs", g)
    if v.size != c.size:
        raise ValueError(f"group {g}: values has {v.size} options but costs has {c.size}")
    out = (v, c, _pareto_group(c, v))
    memo[key] = (values, costs, out)
    return out


def _result(vals: list[np.ndarray], csts: list[np.ndarray], choice: np.ndarray, max_frontier: int = 0) -> McKpResult:
    """The :class:`McKpResult` of ``choice`` (one option index per group), with its totals."""
    n_groups = len(vals)
    value = float(sum(vals[g][choice[g]] for g in range(n_groups)))
    cost = float(sum(csts[g][choice[g]] for g in range(n_groups)))
    return McKpResult(torch.as_tensor(choice, dtype=torch.long), value, cost, max_frontier)


class _Reduced(NamedTuple):
    """What steps 2.-4. leave: the options still possible per group (original indices ``p_idx``,
    costs ``p_c``, values ``p_v``), their hull segments, the best known solution (value ``lb``,
    original option indices ``lb_choice``) and whether that solution is already optimal."""

    p_idx: list[np.ndarray]
    p_c: list[np.ndarray]
    p_v: list[np.ndarray]
    segs: _Segments
    lb: float
    lb_choice: np.ndarray
    solved: bool


def _reduce_options(p_idx, p_c, p_v, cap: float, ctol: float, eps: float, segs: _Segments) -> _Reduced:
    """Steps 2.-4.: a greedy lower bound, then the options whose LP bound is below it removed, for
    at most :data:`_MAX_REDUCTION_ROUNDS` rounds (while a round removes anything).  ``segs`` are the
    hull segments of the options as given (the first round's)."""
    n_groups = len(p_c)
    lb = -math.inf
    lb_choice = None
    for rnd in range(_MAX_REDUCTION_ROUNDS):
        if rnd:
            segs = _Segments(p_c, p_v)
        cur = _greedy_feasible(p_c, p_v, segs, cap)
        cur_v = float(sum(p_v[g][cur[g]] for g in range(n_groups)))
        if cur_v > lb:
            lb = cur_v
            lb_choice = np.array([p_idx[g][cur[g]] for g in range(n_groups)], dtype=np.int64)
        keep = _reduce(p_c, p_v, segs, cap + ctol, lb - eps)
        if keep is None:  # nothing removed
            break
        if any(not k.any() for k in keep):  # only through round-off: the greedy answer is optimal
            return _Reduced(p_idx, p_c, p_v, segs, lb, lb_choice, True)
        p_idx = [p_idx[g][keep[g]] for g in range(n_groups)]
        p_c = [p_c[g][keep[g]] for g in range(n_groups)]
        p_v = [p_v[g][keep[g]] for g in range(n_groups)]
    else:
        segs = _Segments(p_c, p_v)
    return _Reduced(p_idx, p_c, p_v, segs, lb, lb_choice, False)


class _FrontierSearch:
    """Step 5: the exact search over Pareto frontiers, one group at a time (the groups with the
    fewest options first, which keeps early frontiers small).

    ``lb`` is the value of the best solution known; ``lb_completion`` says how to rebuild it
    (``None``: it is ``lb_choice``, the greedy one; else a cheap completion, see :meth:`_bound`).
    ``parents[t]``/``options[t]`` hold, for every entry of frontier ``t``, the entry of frontier
    ``t - 1`` it extends and the option of group ``perm[t]`` it takes.
    """

    def __init__(self, reduced: _Reduced, cap: float, ctol: float, eps: float) -> None:
        self.p_idx, self.p_c, self.p_v, self.segs = reduced.p_idx, reduced.p_c, reduced.p_v, reduced.segs
        self.cap, self.ctol, self.eps = cap, ctol, eps
        self.lb, self.lb_choice = reduced.lb, reduced.lb_choice
        self.lb_completion: tuple | None = None
        self.n_groups = n_groups = len(self.p_c)
        n_opt = np.array([pc.size for pc in self.p_c])
        min_c = np.array([pc[0] for pc in self.p_c])
        base_v = np.array([pv[0] for pv in self.p_v])
        self.perm = perm = np.argsort(n_opt, kind="stable")
        rank = np.empty(n_groups, dtype=np.int64)
        rank[perm] = np.arange(n_groups)
        self.seg_rank = rank[self.segs.g]
        # suffix sums over the processing order: what the groups still to come contribute at minimum
        self.min_after = np.concatenate([np.cumsum(min_c[perm][::-1])[::-1][1:], [0.0]])
        self.base_after = np.concatenate([np.cumsum(base_v[perm][::-1])[::-1][1:], [0.0]])
        self.parents: list[np.ndarray] = []
        self.options: list[np.ndarray] = []

    def run(self) -> tuple[np.ndarray, int]:
        """An optimal choice (original option indices per group) and the largest frontier size."""
        front_c, front_v, lead = self._single_option_prefix()
        max_front = 1
        for t, g in enumerate(self.perm[lead:], start=lead):
            f = front_c.size
            sel = self._candidates(t, front_c, front_v)
            if sel.size == 0:  # only through round-off: the best known solution is optimal
                return self._rebuild_lb(), max_front
            sel, front_c, front_v = _pareto_frontier(sel, self.p_c[g], self.p_v[g], front_c, front_v)
            self.parents.append(sel % f)
            self.options.append(sel // f)
            max_front = max(max_front, int(sel.size))

        # The best final entry is the last one (values increase along the frontier).  It is at least
        # the lower bound up to round-off; when a known solution is better by more, that one is returned.
        if front_v[-1] < self.lb - self.eps:
            return self._rebuild_lb(), max_front
        choice = np.empty(self.n_groups, dtype=np.int64)
        self._trace(choice, self.n_groups - 1, front_c.size - 1)
        return choice, max_front

    def _single_option_prefix(self) -> tuple[np.ndarray, np.ndarray, int]:
        """The one-entry frontier after the leading groups that have a single option left (the
        processing order puts them first), all but the last of them added without the per-step
        tests: fixing such a group changes no bound.  Returns (costs, values, steps done)."""
        front_c, front_v = np.zeros(1), np.zeros(1)
        lead = 0
        while lead + 1 < self.n_groups and self.p_c[self.perm[lead + 1]].size == 1:
            g = self.perm[lead]
            front_c = self.p_c[g][:1] + front_c  # the same additions as in the candidate tests
            front_v = self.p_v[g][:1] + front_v
            self.parents.append(np.zeros(1, dtype=np.int64))
            self.options.append(np.zeros(1, dtype=np.int64))
            lead += 1
        return front_c, front_v, lead

    def _candidates(self, t: int, front_c: np.ndarray, front_v: np.ndarray) -> np.ndarray:
        """The (option r, frontier entry e) pairs of step ``t`` that pass the budget and bound tests,
        numbered ``r * f + e`` (``f`` entries in the frontier); may raise the lower bound."""
        g = self.perm[t]
        c, v = self.p_c[g], self.p_v[g]
        f = front_c.size
        last = t + 1 == self.n_groups
        if not last:
            rest = self.seg_rank > t
            xp, fp = _lp_table(self.segs.dc[rest], self.segs.dv[rest])
        # Row r (option r) is sorted by cost.  Rows are taken in chunks so that huge frontiers never
        # need one huge temporary array.
        rows = max(1, _CHUNK // f)
        kept = []
        for r0 in range(0, c.size, rows):
            cand_c = (c[r0 : r0 + rows, None] + front_c[None, :]).ravel()
            cand_v = (v[r0 : r0 + rows, None] + front_v[None, :]).ravel()
            if last:
                ok = cand_c <= self.cap
                bound = cand_v
            else:
                ok, bound = self._bound(t, r0, f, cand_c, cand_v, xp, fp, rest)
            ok &= bound >= self.lb - self.eps
            kept.append(np.flatnonzero(ok) + r0 * f)
        return np.concatenate(kept) if len(kept) > 1 else kept[0]

    def _bound(self, t: int, r0: int, f: int, cand_c: np.ndarray, cand_v: np.ndarray,
               xp: np.ndarray, fp: np.ndarray, rest: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Feasibility mask and LP upper bound of candidates of step ``t`` (not the last step)."""
        slack = self.cap - self.min_after[t] - cand_c
        ok = slack >= -self.ctol
        room = np.maximum(slack, 0.0)
        bound = cand_v + self.base_after[t] + np.interp(room, xp, fp)
        # Cheap feasible completions: the remaining groups take the whole segments that fit, in
        # slope order (every group ends on a hull vertex).  The best one may raise the lower bound.
        n_full = np.searchsorted(xp, room, side="right") - 1
        complete = np.where(slack >= 0.0, cand_v + fp[n_full], -np.inf)
        k = int(np.argmax(complete))
        if complete[k] + self.base_after[t] > self.lb:
            self.lb = float(complete[k] + self.base_after[t])
            self.lb_completion = (t, k % f, r0 + k // f, int(n_full[k]), rest)
        return ok, bound

    def _trace(self, choice: np.ndarray, t_last: int, i: int) -> None:
        """Fill ``choice`` for the groups of steps ``0..t_last`` from entry ``i`` of that frontier."""
        for t in range(t_last, -1, -1):
            g = self.perm[t]
            choice[g] = self.p_idx[g][self.options[t][i]]
            i = self.parents[t][i]

    def _rebuild_lb(self) -> np.ndarray:
        """The choice of the solution worth ``lb``."""
        if self.lb_completion is None:
            return self.lb_choice
        t, parent, opt, n_full, rest = self.lb_completion
        choice = np.empty(self.n_groups, dtype=np.int64)
        self._trace(choice, t - 1, parent)
        choice[self.perm[t]] = self.p_idx[self.perm[t]][opt]
        steps = np.bincount(self.segs.g[rest][:n_full], minlength=self.n_groups)
        for g in self.perm[t + 1 :]:
            choice[g] = self.p_idx[g][self.segs.hull[g][steps[g]]]
        return choice


def _pareto_frontier(sel: np.ndarray, c: np.ndarray, v: np.ndarray, front_c: np.ndarray,
                     front_v: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The candidates ``sel`` (numbered ``r * f + e``: option ``r`` of costs ``c``/values ``v``
    added to entry ``e`` of the frontier) sorted by cost and reduced to the Pareto frontier:
    the kept candidates, their costs and their values."""
    f = front_c.size
    # the same additions as in the candidate tests, so the same floating-point results
    sc = c[sel // f] + front_c[sel % f]
    order = np.argsort(sc, kind="stable")  # timsort: merges the sorted runs
    sel = sel[order]
    sc = sc[order]
    sv = v[sel // f] + front_v[sel % f]
    keep = np.ones(sel.size, dtype=bool)
    if sel.size > 1:
        keep[1:] = sv[1:] > np.maximum.accumulate(sv)[:-1]
    sel, sc, sv = sel[keep], sc[keep], sv[keep]
    if sel.size > 1:  # equal costs: the later entry has the larger value
        dup = np.zeros(sel.size, dtype=bool)
        dup[:-1] = sc[:-1] == sc[1:]
        if dup.any():
            sel, sc, sv = sel[~dup], sc[~dup], sv[~dup]
    return sel, sc, sv


_MAX_REDUCTION_ROUNDS = 4


_CHUNK = 1 << 19  # candidates formed at once in one step of the frontier search

_VECTOR_REDUCE_MAX = 1 << 21  # options x segments up to which all options are reduced at once


_SMALL = [np.arange(n) for n in range(3)]  # the hull of 0, 1 or 2 points: all of them (read only)


class _Segments:
    """Upper-hull segments of all groups, sorted by decreasing slope (value per unit cost).

    ``hull[g]`` are the hull vertices of group ``g`` as indices into its Pareto list; ``dc``, ``dv``
    and ``g`` are the cost step, value step and group of every segment; ``min_c``/``base_v`` are each
    group's cheapest Pareto option's cost and value (where its hull starts).
    """

    def __init__(self, p_c: list[np.ndarray], p_v: list[np.ndarray]):
        n_groups = len(p_c)
        self._without: dict[int, tuple[np.ndarray, np.ndarray]] = {}
        self._rows: tuple[np.ndarray, np.ndarray] | None = None  # see lp_without
        self.hull = [_upper_hull(p_c[g], p_v[g]) if p_c[g].size > 2 else _SMALL[p_c[g].size]
                     for g in range(n_groups)]
        self.min_c = np.array([pc[0] for pc in p_c])
        self.base_v = np.array([pv[0] for pv in p_v])
        dcs, dvs, keys, gs, hs = [], [], [], [], []
        for g, h in enumerate(self.hull):
            if h.size > 1:
                hc, hv = p_c[g][h], p_v[g][h]
                dc, dv = hc[1:] - hc[:-1], hv[1:] - hv[:-1]
                dcs.append(dc)
                dvs.append(dv)
                # Hull slopes decrease; the running minimum guards against a rounded division
                # putting two nearly equal slopes of one group out of order.
                keys.append(np.minimum.accumulate(dv / dc))
                gs.append(np.full(h.size - 1, g))
                hs.append(np.arange(h.size - 1))
        if not dcs:
            self.dc = self.dv = np.zeros(0)
            self.g = np.zeros(0, dtype=np.int64)
            return
        dc, dv, key, gg, hh = (np.concatenate(a) for a in (dcs, dvs, keys, gs, hs))
        # Decreasing slope; ties keep each group's hull order, so every prefix of the sorted list
        # takes a prefix of each group's segments (a hull vertex per group).
        order = np.lexsort((hh, gg, -key))
        self.dc, self.dv, self.g = dc[order], dv[order], gg[order]

    def lp_without(self, gid: np.ndarray, room: np.ndarray) -> np.ndarray:
        """For every ``(gid[i], room[i])``: the LP gain of all groups but ``gid[i]`` at budget
        ``room[i] >= 0``, the value :meth:`without`'s table gives (to round-off)."""
        if self._rows is None:  # per group: the global prefix sums with the group's own segments zeroed
            other = self.g[None, :] != np.arange(self.min_c.size)[:, None]
            zero = np.zeros((other.shape[0], 1))
            self._rows = (np.hstack([zero, np.cumsum(self.dc * other, axis=1)]),
                          np.hstack([zero, np.cumsum(self.dv * other, axis=1)]))
        xs, fs = self._rows[0][gid], self._rows[1][gid]
        idx = (xs < room[:, None]).sum(axis=1)  # rows are nondecreasing: the first point >= room
        lo = np.maximum(idx - 1, 0)
        hi = np.minimum(idx, xs.shape[1] - 1)
        r = np.arange(gid.size)
        x0, x1, f0, f1 = xs[r, lo], xs[r, hi], fs[r, lo], fs[r, hi]
        span = np.where(x1 > x0, x1 - x0, 1.0)
        return np.where(idx > xs.shape[1] - 1, fs[:, -1], f0 + (room - x0) * ((f1 - f0) / span))

    def without(self, g: int) -> tuple[np.ndarray, np.ndarray]:
        """The LP table (:func:`_lp_table`) of every group's segments but group ``g``'s (memoised:
        an instance solved at several capacities reuses its first round's tables)."""
        if g not in self._without:
            other = self.g != g
            self._without[g] = _lp_table(self.dc[other], self.dv[other])
        return self._without[g]


def _reduce(p_c, p_v, segs: _Segments, cap: float, threshold: float) -> list[np.ndarray] | None:
    """Keep-masks of the options that may still be in an optimal solution (``None``: all of them).

    Option ``j`` of group ``g`` is dropped when fixing it leaves a budget the other groups cannot
    meet even at their cheapest, or when its value plus the LP bound of all *other* groups at the
    budget left over is below ``threshold`` (the lower bound minus a tolerance).  All options are
    tested at once (:meth:`_Segments.lp_without`) unless that table would be large.
    """
    sizes = [pc.size for pc in p_c]
    if sum(sizes) * (segs.dc.size + 1) > _VECTOR_REDUCE_MAX:
        return _reduce_per_group(p_c, p_v, segs, cap, threshold)
    gid = np.repeat(np.arange(len(p_c)), sizes)
    c, v = np.concatenate(p_c), np.concatenate(p_v)
    slack = cap - (float(segs.min_c.sum()) - segs.min_c[gid]) - c
    ub = v + (float(segs.base_v.sum()) - segs.base_v[gid]) + segs.lp_without(gid, np.maximum(slack, 0.0))
    keep = (slack >= 0.0) & (ub >= threshold)
    if keep.all():
        return None
    return np.split(keep, np.cumsum(sizes)[:-1])


def _reduce_per_group(p_c, p_v, segs: _Segments, cap: float, threshold: float) -> list[np.ndarray] | None:
    """:func:`_reduce`, one group at a time (large instances)."""
    min_total = float(segs.min_c.sum())
    base_total = float(segs.base_v.sum())
    keeps = []
    changed = False
    for g in range(len(p_c)):
        xp, fp = segs.without(g)
        slack = cap - (min_total - segs.min_c[g]) - p_c[g]
        ub = p_v[g] + (base_total - segs.base_v[g]) + np.interp(np.maximum(slack, 0.0), xp, fp)
        keep = (slack >= 0.0) & (ub >= threshold)
        changed |= not keep.all()
        keeps.append(keep)
    return keeps if changed else None


def _greedy_feasible(p_c, p_v, segs: _Segments, cap: float) -> np.ndarray:
    """A good feasible choice (indices into each group's Pareto list) for the lower bound."""
    n_groups = len(p_c)
    residual = cap - float(segs.min_c.sum())
    taken = np.cumsum(segs.dc) <= residual
    # keep only the prefix that fits (stop at the first segment that does not)
    n_take = int(np.argmin(taken)) if not taken.all() else taken.size
    steps = np.bincount(segs.g[:n_take], minlength=n_groups)
    cur = np.array([segs.hull[g][steps[g]] for g in range(n_groups)], dtype=np.int64)

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
