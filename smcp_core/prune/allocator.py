"""The SMCP allocation step: importance -> per-group options -> knapsack -> masks.

At each mask update every group offers the options "keep the k most important channel classes"
(k on the channel grid; frozen classes are always kept).  An option's value is the summed
importance of the kept classes; its cost is the latency (or FLOPs/params) of every layer reading
the group at the resulting input width, with each layer's output width taken from the current
masks (input-side attribution; a layer is charged to the group it reads).  A multiple-choice
knapsack picks one option per group under the budget.  Because output widths are held at their
current value while solving, the true cost of the new masks is recomputed afterwards and, if
needed, the solve is repeated with the new widths and a tightened budget until it fits.

On graphs whose layers each couple at most two groups (ResNets: a bottleneck's two inner groups),
each hub candidate is instead solved exactly: the groups joined by layers form components whose
joint options have exact true costs (:class:`_BoundPlan`), so one knapsack over components needs no
held widths and no capacity correction, and finds masks at least as valuable.  The LP relaxation of
that knapsack bounds a candidate's value, and candidates whose bound is below the best value found
are skipped.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from smcp_core.config.recipe import PruneConfig
from smcp_core.errors import InfeasibleTarget, SmcpError
from smcp_core.graph.channel_graph import ChannelGraph, LayerInfo
from smcp_core.profile.cost_model import CostModel
from smcp_core.prune.knapsack import McKpInstance, lp_upper_bound


@dataclass
class SolveResult:
    keep: torch.Tensor
    budget: float
    cost: float  # actual layer-sum cost of ``keep``
    value: float
    iterations: int
    widths: dict[int, int]  # group index -> kept classes
    fraction: float | None = None  # the common kept fraction (solve_uniform only)


class Allocator:
    """Builds the option lists and solves for masks.

    Cost attribution.  A layer's latency depends on its input width (set by the group it reads)
    and its output width (set by the group its outputs belong to).  A multiple-choice knapsack
    needs each option's cost to depend on its own group only, so every layer is charged to one
    group and the other width is held fixed:

    * groups read or written by many layers (the residual streams of ResNets, MobileNetV2's
      linear bottlenecks) are *hubs*: their width is enumerated in an outer loop (coordinate
      descent over hubs), so within one knapsack solve it is a known constant;
    * a layer between a hub and an ordinary group is charged to the ordinary group, with the hub
      width fixed at the candidate value: exact, so e.g. a CIFAR ResNet block (stream -> inner ->
      stream) is costed exactly;
    * any other layer is charged to the group it reads, with its output width held at the current
      masks (SMCP's input-side attribution), and the capacity is corrected afterwards against the
      true cost of the solution.
    """

    HUB_MIN_LAYERS = 4  # a group touched by at least this many conv/linear layers is a hub
    HUB_CANDIDATES = 16  # widths tried per hub per round
    BOUND_MAX_OPTIONS = 4096  # largest joint option list of a component in a hub candidate's bound
    # solve each hub candidate exactly over components (true costs, no linearisation) when the
    # graph allows it (:class:`_BoundPlan`); False: the linearised solve with capacity correction
    EXACT_COMPONENTS = True

    def __init__(self, graph: ChannelGraph, cost: CostModel, *, channel_round: int = 8, min_channels: int = 8,
                 layer_pruning: bool = False, stickiness: float = 0.0, cost_weight: float = 1.0) -> None:
        """Kept widths are multiples of ``channel_round`` (or the full width), at least ``min_channels``;
        ``layer_pruning`` lets a removable group go to zero; when re-solving, currently kept classes
        count ``1 + stickiness`` times their importance; ``cost_weight`` is the share of a layer's
        cost charged to its input group (1 = SMCP, 0 = HALP)."""
        w = float(cost_weight)
        if not 0.0 <= w <= 1.0:
            raise SmcpError(f"prune.cost_weight = {w}: must be between 0 and 1")
        self.graph = graph
        self.cost = cost
        self.channel_round = channel_round
        self.min_channels = min_channels
        self.layer_pruning = layer_pruning
        self.stickiness = stickiness
        self.cost_weight = cost_weight
        self.full_keep = graph.full_keep()
        self.full_cost = cost.total(self.full_keep)
        self._cap: dict[int, int] | None = None  # per-group width caps of a monotone solve
        self._index_labels()
        self._memo: dict[tuple[int, int, int], float] = {}  # (layer, cin, cout) -> cost, for _total
        self._memo_removed = cost.removed_cost
        layers = _grouped_layers(graph)
        # a channel-wise conv whose channels no conv/linear reads (every class frozen) belongs to no
        # group: its cost is a constant of every option, never charged to a group
        self._const = sum(float(cost.layer_cost(layer, torch.tensor([layer.sig.cin]), layer.sig.cout)[0])
                          for layer in graph.layers if layer.group < 0)  # in no option's cost
        touch, out_group = self._touches(layers)
        self._segments = group_segments(graph, layers)
        self._atoms = {g.index: _atoms(g.size, self._segments[g.index]) for g in graph.groups}
        self.hubs = [g.index for g in graph.groups
                     if g.prunable and touch[g.index] >= self.HUB_MIN_LAYERS and g.n_frozen == 0]
        self._bound_plan = _BoundPlan.build(self, layers) if cost_weight == 1.0 else None
        self._plan = self._charge_plan(layers, out_group, w)

    def _index_labels(self) -> None:
        """Per class its position in its group; every layer's input and output classes, flattened."""
        graph = self.graph
        local = torch.full((graph.n_classes,), -1, dtype=torch.long)
        for g in graph.groups:
            local[g.classes] = torch.arange(g.size)
        self._local = local
        self._in_cls, self._in_of = _flat_labels([layer.in_labels for layer in graph.layers])
        self._out_cls, self._out_of = _flat_labels([layer.out_labels for layer in graph.layers])
        self._in_start = _starts(self._in_of, len(graph.layers))
        self._out_start = _starts(self._out_of, len(graph.layers))
        self._group_of = graph.class_group.numpy().copy()

    def _touches(self, layers: list[LayerInfo]) -> tuple[list[int], dict[int, int]]:
        """Per group the number of (non-depthwise) layers reading or writing it, and per layer the one
        group it writes (-1: none or several)."""
        touch = [0] * len(self.graph.groups)
        out_group: dict[int, int] = {}
        for layer in layers:
            if layer.kind == "dwconv":
                continue
            og = [x for x in torch.unique(self.graph.class_group[layer.out_labels]).tolist() if x >= 0]
            out_group[layer.index] = og[0] if len(og) == 1 else -1
            touch[layer.group] += 1
            for x in og:
                touch[x] += 1
        return touch, out_group

    def _charge_plan(self, layers: list[LayerInfo], out_group: dict[int, int],
                     w: float) -> dict[int, list[tuple[LayerInfo, str, torch.Tensor, float]]]:
        """Per group the layers whose cost its options change: (layer, mode, positions in the charged
        group, share of the layer's cost).

        Mode "in": cin from the charged group's option, cout from the current masks; "out": cout from
        the charged group's option, cin from the current masks (a hub's reader); "dw": depthwise,
        width from the charged group's option.  With cost_weight ``w`` < 1 a layer whose input and
        output groups are both ordinary prunable groups is charged ``w`` to its input group (output
        width held) and ``1 - w`` to its output group (input width held); ``w`` = 0 is HALP's
        output-side view.  Hub layers stay exact whatever ``w`` is."""
        graph, local, hubset = self.graph, self._local, set(self.hubs)
        plan: dict[int, list[tuple[LayerInfo, str, torch.Tensor, float]]] = {g.index: [] for g in graph.groups}
        for layer in layers:
            if layer.kind == "dwconv":
                plan[layer.group].append((layer, "dw", local[layer.in_labels], 1.0))
                continue
            a, b = layer.group, out_group.get(layer.index, -1)
            b_ordinary = b >= 0 and b != a and b not in hubset and graph.groups[b].prunable
            if a in hubset and b_ordinary:
                plan[b].append((layer, "out", local[layer.out_labels], 1.0))
            elif w < 1.0 and b_ordinary and a not in hubset and graph.groups[a].prunable:
                if w > 0.0:
                    plan[a].append((layer, "in", local[layer.in_labels], w))
                plan[b].append((layer, "out", local[layer.out_labels], 1.0 - w))
            else:
                plan[a].append((layer, "in", local[layer.in_labels], 1.0))
        return plan

    @classmethod
    def from_recipe(cls, graph: ChannelGraph, cost: CostModel, prune_config: PruneConfig) -> Allocator:
        """The allocator a run's recipe asks for: its settings from the recipe's ``prune`` section."""
        pc = prune_config
        return cls(graph, cost, channel_round=pc.channel_round, min_channels=pc.min_channels,
                   layer_pruning=pc.layer_pruning, stickiness=pc.stickiness, cost_weight=pc.cost_weight)

    # ------------------------------------------------------------------
    def grid(self, g, n_mandatory: int = 0) -> torch.Tensor:
        """Allowed numbers of kept classes for group ``g`` (at least ``n_mandatory``, or 0)."""
        if not g.prunable:
            return torch.tensor([g.size])
        r = max(1, self.channel_round)
        lo = max(g.n_frozen, min(self.min_channels, g.size), 1, n_mandatory)
        ks = set(range(r, g.size + 1, r)) | {g.size}
        ks = {k for k in ks if k >= lo}
        if not ks:
            ks = {g.size}
        if self.layer_pruning and g.removable and g.n_frozen == 0:
            ks.add(0)
        if self._cap is not None and g.index in self._cap:
            # monotone solve: never wider than the group is now (its pruned classes sort last)
            ks = {k for k in ks if k <= self._cap[g.index]} or {min(ks)}
        return torch.tensor(sorted(ks))

    def min_cost(self) -> float:
        """Approximate smallest reachable layer-sum cost: every prunable group at its smallest
        option (for messages; feasibility itself is decided by :meth:`solve`)."""
        keep = self.full_keep.clone()
        zeros = torch.zeros(self.graph.n_classes, dtype=torch.float64)
        for g in self.graph.groups:
            if not g.prunable:
                continue
            order, _, _, n_mand = self._order(g, zeros)
            k = int(self.grid(g, n_mand)[0])
            keep[g.classes] = False
            keep[g.classes[order[:k]]] = True
        return self.cost.total(keep)

    def _order(self, g, scores: torch.Tensor):
        """Keep order of a group's classes: frozen ones, then each segment's most important
        ``min_channels`` classes, then the rest by importance.  Returns (order, cumulative value,
        rank, number of mandatory classes).

        A group whose layers read different parts of it (a CIFAR ResNet's residual stream: stage 1
        reads 16 of its classes, stage 2 those and 16 more, ...) is ordered in *units* of
        ``channel_round`` classes of one atom (the classes read by the same layers), so every
        multiple of ``channel_round`` keeps a multiple of it in each atom and every layer's width
        stays on the grid (not 7/11/12 of 16/32/64, off the runtime's channel blocks)."""
        s = scores[g.classes].clone()
        s[g.frozen] = float("inf")
        m = max(1, self.min_channels)
        if len(self._atoms[g.index]) > 1 and self.channel_round > 1:
            order, n_mand = _order_by_units(s, self._atoms[g.index], self._segments[g.index], self.channel_round, m)
        else:
            prio = torch.zeros(g.size, dtype=torch.int8)
            prio[g.frozen] = 2
            for seg in self._segments[g.index]:
                top = seg[torch.argsort(s[seg], descending=True, stable=True)[: min(m, seg.numel())]]
                prio[top] = torch.maximum(prio[top], torch.ones_like(prio[top]))
            key = torch.argsort(s, descending=True, stable=True)
            order = key[torch.argsort(prio[key], descending=True, stable=True)]
            n_mand = int((prio > 0).sum())
        sv = scores[g.classes][order]
        sv = torch.where(torch.isinf(s[order]), torch.zeros_like(sv), sv)
        csum = torch.cat([torch.zeros(1, dtype=torch.float64), torch.cumsum(sv, 0)])
        rank = torch.empty(g.size, dtype=torch.long)
        rank[order] = torch.arange(g.size)
        return order, csum, rank, n_mand

    def options(self, scores: torch.Tensor, keep_now: torch.Tensor, fixed: dict[int, int] | None = None,
                cache: dict | None = None):
        """(values, costs, ks, orders) per group for the knapsack.  Groups in ``fixed`` (hubs)
        get the single option of that width; other widths come from ``keep_now``.  ``cache`` (one
        per solve, i.e. per score vector) keeps each group's order and every option cost vector
        already built, so re-linearising at new widths only recomputes the groups they change."""
        scores = scores.detach().to(torch.float64).cpu()
        fixed = fixed or {}
        cache = {} if cache is None else cache
        cin_now, cout_now = self._layer_widths(keep_now)
        values, costs, ks, orders = [], [], [], []
        for g in self.graph.groups:
            if g.index not in cache:
                cache[g.index] = self._order(g, scores)
            w = fixed.get(g.index)
            grid, vals = self._grid_values(g, w, cache)
            values.append(vals)
            costs.append(self._group_cost(g, w, grid, cin_now, cout_now, cache))
            ks.append(grid)
            orders.append(cache[g.index][0])
        return values, costs, ks, orders

    def _grid_values(self, g, width: int | None, cache: dict) -> tuple[torch.Tensor, torch.Tensor]:
        """The group's option widths (its grid, or the one fixed ``width``) and their values."""
        key = ("grid", g.index, width)
        if key not in cache:
            _, csum, _, n_mand = cache[g.index]
            grid = self.grid(g, n_mand) if width is None else torch.tensor([width])
            cache[key] = (grid, csum[grid])
        return cache[key]

    def _group_cost(self, g, width: int | None, grid: torch.Tensor, cin_now, cout_now, cache: dict) -> torch.Tensor:
        """Option costs of group ``g``: every layer charged to it at the option widths, its other
        width held at the current masks (memoised on those held widths)."""
        plan = self._plan[g.index]
        held = tuple(int(cout_now[layer.index]) if mode == "in" else int(cin_now[layer.index]) if mode == "out" else 0
                     for layer, mode, _, _ in plan)
        key = ("cost", g.index, width, held)
        if key in cache:
            return cache[key]
        rank = cache[g.index][2]
        c = torch.zeros(len(grid), dtype=torch.float64)
        for i, ((layer, mode, pos, share), other) in enumerate(zip(plan, held)):
            cnt = self._kept_counts(g, i, width, rank, pos, grid, cache)
            if mode == "in":
                lc = self.cost.layer_cost(layer, cnt, other)
            elif mode == "out":
                lc = self.cost.layer_cost(layer, torch.full_like(cnt, other), cnt)
            else:
                lc = self.cost.layer_cost(layer, cnt, cnt)
            c += lc if share == 1.0 else share * lc
        cache[key] = c
        return c

    @staticmethod
    def _kept_counts(g, i: int, width, rank, pos, grid, cache: dict) -> torch.Tensor:
        """How many of a layer's positions ``pos`` in group ``g`` each option width keeps."""
        key = ("cnt", g.index, i, width)
        if key not in cache:
            cache[key] = torch.searchsorted(torch.sort(rank[pos]).values, grid, right=False)
        return cache[key]

    def _layer_widths(self, keep: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
        """(input widths, output widths) of every layer at a keep-mask (numpy: no torch thread pool
        for these small sums)."""
        k = keep.detach().cpu().numpy().astype(np.int64)
        n = len(self.graph.layers)
        return (_segment_sums(k[self._in_cls], self._in_of, self._in_start, n),
                _segment_sums(k[self._out_cls], self._out_of, self._out_start, n))

    def _total(self, keep: torch.Tensor) -> float:
        """``cost.total(keep)``, the same sum of the same layer costs, memoised per layer widths."""
        if self._memo_removed != self.cost.removed_cost:  # the closed loop re-fitted it
            self._memo.clear()
            self._memo_removed = self.cost.removed_cost
        memo, out = self._memo, []
        for layer, ci, co in zip(self.graph.layers, *(w.tolist() for w in self._layer_widths(keep))):
            c = memo.get((layer.index, ci, co))
            if c is None:
                c = memo[(layer.index, ci, co)] = float(self.cost.layer_cost(layer, torch.tensor([ci]), co)[0])
            out.append(c)
        return float(torch.tensor(out, dtype=torch.float64).sum())

    def _keep_from(self, choice: torch.Tensor, ks, orders, rank: np.ndarray | None = None) -> torch.Tensor:
        """The keep-mask of one option per group: each group keeps the first ``k`` of its order
        (``rank``: :meth:`_class_ranks` of ``orders``, when the caller has it)."""
        k_of = np.array([int(grid[j]) for grid, j in zip(ks, choice.tolist())] + [0], dtype=np.int64)
        rank = self._class_ranks(orders) if rank is None else rank
        grouped = self._group_of >= 0
        keep = self.full_keep.numpy().copy()
        keep[grouped] = rank[grouped] < k_of[self._group_of[grouped]]
        return torch.from_numpy(keep)

    def _class_ranks(self, orders, cache: dict | None = None) -> np.ndarray:
        """Every channel class's position in its group's keep order (-1: in no group); memoised in
        ``cache`` (one solve's orders never change)."""
        if cache is not None and "rank" in cache:
            return cache["rank"]
        rank = np.full(self.graph.n_classes, -1, dtype=np.int64)
        for g, order in zip(self.graph.groups, orders):
            rank[g.classes.numpy()[order.numpy()]] = np.arange(g.size)
        if cache is not None:
            cache["rank"] = rank
        return rank

    def _set_width(self, keep: torch.Tensor, g, k: int, order: torch.Tensor) -> torch.Tensor:
        keep = keep.clone()
        keep[g.classes] = False
        keep[g.classes[order[:k]]] = True
        return keep

    def _hub_candidates(self, g, current: int, n_mand: int = 0) -> list[int]:
        grid = self.grid(g, n_mand).tolist()
        n = self.HUB_CANDIDATES if len(self.hubs) == 1 else max(4, self.HUB_CANDIDATES // 2)
        if len(grid) <= n:
            return grid
        idx = torch.linspace(0, len(grid) - 1, n).round().long().tolist()
        cands = {grid[i] for i in idx}
        # refine around the current width
        j = min(range(len(grid)), key=lambda i: abs(grid[i] - current))
        cands.update(grid[max(0, j - 2): j + 3])
        return sorted(cands)

    def _best_candidate(self, scores, budget, cur, g, n_mand, cache, inner: int, state: dict) -> SolveResult | None:
        """The best solution over hub ``g``'s candidate widths (the first of equal ones).  Each
        candidate's value has an upper bound (:meth:`_candidate_bound`); candidates are solved in
        order of decreasing bound, and those whose bound is below the best value found so far are
        not solved: they cannot win."""
        order = cache[g.index][0]
        cands = []
        for i, k in enumerate(self._hub_candidates(g, int(cur[g.classes].sum()), n_mand)):
            lin = self._set_width(cur, g, k, order)
            fixed = {x: int(lin[self.graph.groups[x].classes].sum()) for x in self.hubs}
            cands.append((self._candidate_bound(fixed, budget, cache), i, lin, fixed))
        best, best_i = None, -1
        for ub, i, lin, fixed in sorted(cands, key=lambda c: -c[0]):  # stable: ties in list order
            if best is not None and ub < best.value - 1e-9 * abs(best.value):
                break
            if self.EXACT_COMPONENTS and self._bound_plan is not None:
                state["n"] += 1
                r = self._solve_exact(budget, fixed, cache)
            else:
                r = self._solve_at(scores, budget, lin, fixed, cache, inner, state)
            if r is not None and (best is None or r.value > best.value or (r.value == best.value and i < best_i)):
                best, best_i = r, i
        return best

    def _solve_exact(self, budget: float, fixed: dict[int, int], cache: dict) -> SolveResult | None:
        """The most valuable mask with the hub widths ``fixed`` whose true cost meets ``budget``:
        one knapsack over the components of :class:`_BoundPlan`, whose option costs are exact (no
        held widths, so no capacity correction); ``None`` when nothing fits."""
        plan = self._bound_plan
        values, costs = plan.options(self, fixed, cache)
        try:
            res = McKpInstance(values, costs, cache.setdefault("knapsack", {})).solve(budget - self._const)
        except InfeasibleTarget:
            return None
        keep = plan.keep(self, res.choice.tolist(), fixed, cache)
        actual = self._total(keep)
        if actual > budget * (1 + 1e-9):  # only through round-off in the summed costs
            return None
        return SolveResult(keep, budget, actual, float(res.value), 0, {})

    def _candidate_bound(self, fixed: dict[int, int], budget: float, cache: dict) -> float:
        """An upper bound on the value of every mask with the hub widths ``fixed`` whose true cost
        meets ``budget`` (``inf`` where the graph's structure is not supported)."""
        plan = self._bound_plan
        if plan is None:
            return math.inf
        values, costs = plan.options(self, fixed, cache)
        cap = budget * (1 + 2e-9) - self._const
        return lp_upper_bound(values, costs, cap, cache.setdefault("knapsack", {}))

    def _solve_at(self, scores, budget, lin, fixed, cache, inner: int, state: dict) -> SolveResult | None:
        """Knapsack at one linearisation point, with capacity correction; best feasible result."""
        values, costs, ks, orders = self.options(scores, lin, fixed, cache)
        instance = McKpInstance(values, costs, cache.setdefault("knapsack", {}))
        cap = budget - self._const
        best = None
        narrowed = False
        lo_cap = hi_cap = None  # knapsack infeasible at lo_cap; true cost over budget at hi_cap
        it = 0
        while it < inner + (4 if best is None else 0):
            it += 1
            state["n"] += 1
            try:
                res = instance.solve(cap, unit=self.cost.unit)
            except InfeasibleTarget:
                if not narrowed and best is None:
                    # output widths held at this point make every option too expensive: hold them
                    # at their narrowest instead (an underestimate, corrected against the true cost)
                    narrowed = True
                    lin = self._narrowest(lin, fixed, cache)
                    values, costs, ks, orders = self.options(scores, lin, fixed, cache)
                    instance = McKpInstance(values, costs, cache["knapsack"])
                    continue
                lo_cap = cap if lo_cap is None else max(lo_cap, cap)
                if hi_cap is None:
                    break
                cap = 0.5 * (lo_cap + hi_cap)
                continue
            keep = self._keep_from(res.choice, ks, orders, self._class_ranks(orders, cache))
            actual = self._total(keep)
            value = float(res.value)
            if actual <= budget * (1 + 1e-9):
                if best is None or value > best.value:
                    best = SolveResult(keep, budget, actual, value, 0, {})
                if actual <= 0 or actual >= budget * (1 - 2e-3):
                    break
                lo_cap = None if lo_cap is None else max(lo_cap, cap)
                nxt = cap * budget / actual
                cap = nxt if hi_cap is None else min(nxt, 0.5 * (cap + hi_cap))
            else:
                hi_cap = cap if hi_cap is None else min(hi_cap, cap)
                nxt = cap * budget / actual
                cap = nxt if lo_cap is None else max(nxt, 0.5 * (lo_cap + hi_cap))
        return best

    def _narrowest(self, keep: torch.Tensor, fixed: dict[int, int], cache: dict) -> torch.Tensor:
        keep = keep.clone()
        for g in self.graph.groups:
            if not g.prunable or g.index in fixed or g.index not in cache:
                continue
            order, _, _, n_mand = cache[g.index]
            keep = self._set_width(keep, g, int(self.grid(g, n_mand)[0]), order)
        return keep

    def _monotone(self, scores: torch.Tensor, keep_now: torch.Tensor) -> tuple[torch.Tensor, dict[int, int]]:
        """Scores with every currently pruned class at -inf (it sorts last and adds no value) and
        each prunable group's current width as its cap: a solution then keeps a subset of what is
        kept now (HALP-style permanent pruning)."""
        s = scores.detach().to(torch.float64).cpu().clone()
        k = keep_now.detach().cpu().bool()
        s[~k] = float("-inf")
        cap = {g.index: int(k[g.classes].sum()) for g in self.graph.groups if g.prunable}
        return s, cap

    def solve(self, scores: torch.Tensor, budget: float, keep_now: torch.Tensor, *,
              rounds: int = 2, inner: int = 3, monotone: bool = False) -> SolveResult:
        """Masks maximising kept importance with true layer-sum cost <= budget.  With
        ``monotone`` the result keeps a subset of ``keep_now`` (a pruned class never returns)."""
        if monotone:
            scores, cap = self._monotone(scores, keep_now)
            self._cap = cap
            try:
                res = self.solve(scores, budget, keep_now, rounds=rounds, inner=inner)
            finally:
                self._cap = None
            return res
        state = {"n": 0}
        cache: dict = {}
        scores_c = scores.detach().to(torch.float64).cpu()
        cur = keep_now.clone().cpu()
        if self.stickiness > 0:
            scores_c = scores_c * (1.0 + self.stickiness * cur.to(torch.float64))
        cache["scores"] = scores_c  # for the groups' orders (:meth:`_candidate_bound`)
        if not self.hubs:
            best = self._solve_without_hubs(scores_c, budget, cur, cache, rounds, inner, state)
        else:
            best = self._solve_over_hubs(scores_c, budget, cur, cache, rounds, inner, state)
        if best is None:
            raise InfeasibleTarget(
                f"cost budget {budget:.4g} {self.cost.unit} is below the minimum reachable "
                f"{self.min_cost():.4g} {self.cost.unit} (every prunable group at its smallest width); "
                "lower the target (e.g. a smaller prune.target.speedup) or allow smaller widths "
                "(prune.min_channels, prune.layer_pruning)"
            )
        best.iterations = state["n"]
        best.widths = self._widths(best.keep)
        return best

    def _solve_without_hubs(self, scores_c, budget: float, cur: torch.Tensor, cache: dict, rounds: int,
                            inner: int, state: dict) -> SolveResult | None:
        """Up to ``rounds`` linearised solves, each at the previous answer; the best by kept importance."""
        best: SolveResult | None = None
        for _ in range(rounds):
            r = self._solve_at(scores_c, budget, cur, {}, cache, inner, state)
            if r is not None and (best is None or r.value > best.value):
                best = r
            if best is None or torch.equal(best.keep, cur):
                break
            cur = best.keep
        return best

    def _solve_over_hubs(self, scores_c, budget: float, cur: torch.Tensor, cache: dict, rounds: int,
                         inner: int, state: dict) -> SolveResult | None:
        """Coordinate search over the hubs' widths (each hub's best candidate with the others held).

        At least two rounds even with one hub: the second is linearised at the first round's
        answer, and the better of the two (by kept importance, which does not depend on the
        linearisation) wins; with one round, successive mask updates can alternate between two very
        different solutions, each looking best from the other."""
        groups = self.graph.groups
        best: SolveResult | None = None
        n_rounds = max(2, rounds)
        rnd = 0
        while rnd < n_rounds or (best is None and rnd < n_rounds + 2):  # extra rounds only if nothing fit yet
            rnd += 1
            for h in self.hubs:
                g = groups[h]
                if g.index not in cache:
                    cache[g.index] = self._order(g, scores_c)
                order, n_mand = cache[g.index][0], cache[g.index][3]
                cur_w = int(cur[g.classes].sum())
                round_best = self._best_candidate(scores_c, budget, cur, g, n_mand, cache, inner, state)
                if round_best is not None:
                    cur = round_best.keep
                    if best is None or round_best.value >= best.value:
                        best = round_best
                elif best is None:
                    # nothing fits while the other hubs are this wide: park this hub at its
                    # narrowest width so the next hubs see the budget that is left
                    k_min = self._hub_candidates(g, cur_w, n_mand)[0]
                    cur = self._set_width(cur, g, k_min, order)
        return best

    def solve_uniform(self, scores: torch.Tensor, budget: float, keep_now: torch.Tensor | None = None, *,
                      monotone: bool = False, iters: int = 48) -> SolveResult:
        """The same kept fraction ``f`` in every prunable group: group ``g`` keeps the grid width
        (multiple of ``channel_round`` or the full width, at least ``min_channels`` and the
        mandatory classes) nearest to ``f * size`` (ties: the smaller), its classes chosen by
        ``scores`` as in :meth:`solve`.  ``f`` is the largest fraction, found by bisection, whose
        true layer-sum cost meets ``budget``.  Uniform allocation never removes a whole group.
        With ``monotone`` (and ``keep_now``) widths are capped at the current ones and only
        currently kept classes can be kept."""
        if monotone and keep_now is not None:
            scores_c, cap = self._monotone(scores, keep_now)
        else:
            scores_c, cap = scores.detach().to(torch.float64).cpu(), None
        self._cap = cap
        try:
            plan = []
            for g in self.graph.groups:
                if not g.prunable:
                    continue
                order, _, _, n_mand = self._order(g, scores_c)
                grid = self.grid(g, n_mand)
                nz = grid[grid > 0]
                plan.append((g, order, nz if nz.numel() else grid))
        finally:
            self._cap = None

        def keep_at(f: float) -> torch.Tensor:
            keep = self.full_keep.clone()
            for g, order, grid in plan:
                j = int(torch.argmin((grid.to(torch.float64) - f * g.size).abs()))  # first = smaller on ties
                keep[g.classes] = False
                keep[g.classes[order[: int(grid[j])]]] = True
            return keep

        lo_keep = keep_at(0.0)
        lo_cost = self.cost.total(lo_keep)
        if lo_cost > budget * (1 + 1e-9):
            raise InfeasibleTarget(
                f"cost budget {budget:.4g} {self.cost.unit} is below the minimum reachable "
                f"{lo_cost:.4g} {self.cost.unit} with the same fraction kept in every group (every prunable "
                "group at its smallest width); lower the target or allow smaller widths "
                "(prune.min_channels, prune.channel_round)")
        hi_keep = keep_at(1.0)
        hi_cost = self.cost.total(hi_keep)
        n = 2
        if hi_cost <= budget * (1 + 1e-9):
            f, keep, cost = 1.0, hi_keep, hi_cost
        else:
            lo, hi = 0.0, 1.0
            keep, cost = lo_keep, lo_cost
            for _ in range(iters):
                mid = 0.5 * (lo + hi)
                k = keep_at(mid)
                c = self.cost.total(k)
                n += 1
                if c <= budget * (1 + 1e-9):
                    lo, keep, cost = mid, k, c
                else:
                    hi = mid
                if hi - lo < 1e-4:
                    break
            f = lo
        sc = scores_c.clone()
        sc[~torch.isfinite(sc)] = 0.0
        value = float(sc[keep & ~self.graph.class_frozen].sum())
        return SolveResult(keep, budget, cost, value, n, self._widths(keep), fraction=f)

    def _widths(self, keep: torch.Tensor) -> dict[int, int]:
        return {g.index: int(keep[g.classes].sum()) for g in self.graph.groups}


def group_segments(graph: ChannelGraph, layers: list[LayerInfo] | None = None) -> dict[int, list[torch.Tensor]]:
    """Per group, the *segments* (sets of its positions) that single layers read or write, where
    smaller than the group: a CIFAR ResNet's residual stream has one per stage (16, 32, 64 of its
    64 positions).  Each segment keeps at least ``min_channels``, so no layer is left without inputs
    or outputs unless the whole group is removed by layer pruning (allowed only where safe)."""
    layers = _grouped_layers(graph) if layers is None else layers
    local = torch.full((graph.n_classes,), -1, dtype=torch.long)
    for g in graph.groups:
        local[g.classes] = torch.arange(g.size)
    segments: dict[int, list[torch.Tensor]] = {g.index: [] for g in graph.groups}
    for layer in layers:
        segments[layer.group].append(torch.unique(local[layer.in_labels]))
        if layer.kind != "dwconv":
            for x in torch.unique(graph.class_group[layer.out_labels]).tolist():
                if x >= 0:
                    mine = layer.out_labels[graph.class_group[layer.out_labels] == x]
                    segments[x].append(torch.unique(local[mine]))
    for gi, segs in segments.items():
        size = graph.groups[gi].size
        uniq = {tuple(t.tolist()) for t in segs if t.numel() < size}
        segments[gi] = [torch.tensor(u) for u in sorted(uniq)]
    return segments


def uniform_keep(graph: ChannelGraph, frac: float, step: int = 1) -> torch.Tensor:
    """Every prunable group thinned to about ``frac``, every layer alike: a group whose layers read
    different parts of it (a CIFAR ResNet's stream: stage 1 reads 16 of its classes, stage 2 those
    and 16 more, ...) keeps, part by part (the parts read by most layers first), the width on the
    grid (multiples of ``step``, or all of them) nearest ``frac`` of the parts so far (16/32/64 at
    0.5, step 4: 8/16/32; step 16: 16/16/32), as the allocator's widths are on its grid.  A later
    part may keep nothing; every segment (the part one layer reads) keeps something.  Frozen
    classes first."""
    keep = graph.full_keep()
    segments = group_segments(graph)
    step = max(1, int(step))
    for g in graph.groups:
        if not g.prunable:
            continue
        first = torch.argsort(g.frozen.to(torch.int8), descending=True, stable=True)  # frozen, then by index
        rank = torch.empty(g.size, dtype=torch.long)
        rank[first] = torch.arange(g.size)
        segs = segments[g.index]
        atoms = sorted(_atoms(g.size, segs), key=lambda pos: -sum(bool(torch.isin(pos[0], seg)) for seg in segs))
        mine = torch.zeros(g.size, dtype=torch.bool)
        n_so_far = 0
        for pos in atoms:
            pos = pos[torch.argsort(rank[pos])]
            n_so_far += pos.numel()
            grid = sorted(set(range(step, n_so_far + 1, step)) | {n_so_far})
            want = min(grid, key=lambda k: (abs(k - frac * n_so_far), k))  # nearest; ties: the smaller
            floor = min(step, pos.numel()) if not bool(mine.any()) else 0
            k = min(pos.numel(), max(floor, want - int(mine.sum()), int(g.frozen[pos].sum())))
            mine[pos[:k]] = True
        for seg in segs:  # (segments that are not nested: none left without inputs)
            if not bool(mine[seg].any()):
                seg = seg[torch.argsort(rank[seg])]
                mine[seg[: min(step, seg.numel())]] = True
        keep[g.classes] = mine
    return keep


def _atoms(size: int, segments: list[torch.Tensor]) -> list[torch.Tensor]:
    """A group's positions partitioned by the segments (layer parts) that contain them: positions
    in the same atom are read and written by the same layers.  One atom when no layer reads a part."""
    if not segments:
        return [torch.arange(size)]
    member = torch.zeros(size, len(segments), dtype=torch.bool)
    for j, seg in enumerate(segments):
        member[seg, j] = True
    _, atom_of = torch.unique(member, dim=0, return_inverse=True)
    return [torch.nonzero(atom_of == a).flatten() for a in range(int(atom_of.max()) + 1)]


def _order_by_units(s: torch.Tensor, atoms: list[torch.Tensor], segments: list[torch.Tensor], r: int,
                    m: int) -> tuple[torch.Tensor, int]:
    """A group's keep order in units of ``r`` classes of one atom (each atom's classes by score,
    ``inf`` = frozen first; an atom's last unit may be shorter), and the number of classes in its
    mandatory units.  Mandatory: the units holding frozen classes, then, segment by segment
    (smallest first), the best next units of its atoms until the segment keeps ``min(m, size)``
    classes.  The other full units follow by summed score, always an atom's next unit, so every
    prefix keeps a prefix of each atom; then the short units (so they do not shift later units off
    the grid); last the classes a monotone solve has pruned (score ``-inf``), which no unit holds,
    so a prefix up to the current width keeps only currently kept classes."""
    units = []  # per atom: its units (classes, value, holds a frozen class)
    pruned = []
    for pos in atoms:
        gone = torch.isneginf(s[pos])
        pruned.append(pos[gone])
        live = pos[~gone]
        mine = live[torch.argsort(s[live], descending=True, stable=True)]
        row = []
        for i in range(0, len(mine), r):
            su = s[mine[i: i + r]]
            value = float(torch.where(torch.isinf(su), torch.zeros_like(su), su).sum())
            row.append((mine[i: i + r], value, bool(torch.isposinf(su).any())))
        units.append(row)
    nxt = [0] * len(atoms)
    picked: list[torch.Tensor] = []

    def take(a: int) -> None:
        picked.append(units[a][nxt[a]][0])
        nxt[a] += 1

    for a, row in enumerate(units):
        while nxt[a] < len(row) and row[nxt[a]][2]:
            take(a)
    inside = [[a for a, pos in enumerate(atoms) if bool(torch.isin(pos[0], seg))] for seg in segments]
    for seg, mine in sorted(zip(segments, inside), key=lambda x: x[0].numel()):
        have = sum(len(u[0]) for a in mine for u in units[a][: nxt[a]])
        while have < min(m, seg.numel()):
            open_ = [a for a in mine if nxt[a] < len(units[a])]
            if not open_:  # the rest of the segment is pruned (monotone): nothing more to keep
                break
            a = max(open_, key=lambda a: units[a][nxt[a]][1])
            have += len(units[a][nxt[a]][0])
            take(a)
    n_mand = sum(len(u) for u in picked)
    for full_only in (True, False):
        while True:
            open_ = [a for a in range(len(atoms)) if nxt[a] < len(units[a])
                     and (not full_only or len(units[a][nxt[a]][0]) == r)]
            if not open_:
                break
            take(max(open_, key=lambda a: (units[a][nxt[a]][1], -a)))
    return torch.cat(picked + pruned), n_mand


def _flat_labels(labels: list[torch.Tensor]) -> tuple[np.ndarray, np.ndarray]:
    """Every layer's channel classes concatenated, and the layer each belongs to (numpy)."""
    if not labels:
        return np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.int64)
    counts = [len(lab) for lab in labels]
    return torch.cat(labels).numpy().astype(np.int64), np.repeat(np.arange(len(labels)), counts)


def _starts(of: np.ndarray, n: int) -> np.ndarray | None:
    """Where each of the ``n`` layers' runs starts in ``of`` (sorted layer ids), or None when a
    layer has no entry (then :func:`_segment_sums` counts with ``bincount``)."""
    counts = np.bincount(of, minlength=n)
    if n == 0 or (counts == 0).any():
        return None
    return np.concatenate([[0], np.cumsum(counts)[:-1]])


def _segment_sums(x: np.ndarray, of: np.ndarray, starts: np.ndarray | None, n: int) -> np.ndarray:
    """Per-layer sums (``n`` layers) of the int64 values ``x`` (``of``: the layer of each value)."""
    if starts is None:
        return np.bincount(of, weights=x, minlength=n).astype(np.int64)
    return np.add.reduceat(x, starts)


def _grouped_layers(graph: ChannelGraph) -> list[LayerInfo]:
    """The layers of ``graph`` that belong to a channel group (every conv/linear layer, and the
    channel-wise convs whose channels some conv/linear reads).  A conv/linear layer without a group
    is a gap in the channel graph: one clear line, never an index error."""
    for layer in graph.layers:
        if layer.is_consumer and not 0 <= layer.group < len(graph.groups):
            raise SmcpError(
                f"channel graph: layer {layer.name} ({layer.kind}) belongs to no channel group; "
                "this is a bug in smcp's graph analysis: please report it with `smcp inspect` output, "
                "and keep the layer out of pruning with model.unpruned or model.leaf_modules meanwhile"
            )
    return [layer for layer in graph.layers if layer.group >= 0]


class _BoundPlan:
    """The true layer-sum cost as a sum over *components*, for exact hub-candidate solves and
    their upper bounds.

    With the hub widths fixed, a layer's cost depends on the widths of at most two groups (the one
    it reads and the one it writes); groups joined by a layer whose both groups are ordinary
    prunable ones form a component (a ResNet bottleneck's two inner groups), whose joint options
    (every combination of its groups' widths) have exact costs.  The knapsack over components is
    then exact, and its LP relaxation bounds every mask's value.  Not built (``build`` returns
    None) when a layer side spans several groups or a component has more than
    ``Allocator.BOUND_MAX_OPTIONS`` joint options; the allocator then solves linearised.
    """

    def __init__(self, layers, components, comp_of, variable: set[int]) -> None:
        self.components = components  # lists of group indices (every group is in one)
        # per component: its layers (layer, in_part, out_part), part = (group | -1, positions,
        # constant width), and the groups outside it that they touch (hubs, unprunable groups)
        self.layers: list[list] = [[] for _ in components]
        self.outside: list[set[int]] = [set() for _ in components]
        for entry in layers:
            a, b = entry[1][0], entry[2][0]
            owner = next((x for x in (a, b) if x in variable), a if a >= 0 else b)
            if owner < 0:
                continue
            ci = comp_of[owner]
            self.layers[ci].append(entry)
            self.outside[ci].update(x for x in (a, b) if x >= 0 and comp_of[x] != ci)
        self.outside_sorted = [sorted(x) for x in self.outside]

    @classmethod
    def build(cls, alloc: Allocator, layers: list[LayerInfo]) -> _BoundPlan | None:
        graph, hubset = alloc.graph, set(alloc.hubs)
        variable = {g.index for g in graph.groups if g.prunable and g.index not in hubset}
        parent = {g.index: g.index for g in graph.groups}

        def find(x: int) -> int:
            while parent[x] != x:
                parent[x] = parent[parent[x]]
                x = parent[x]
            return x

        plan = []
        for layer in layers:
            parts = []
            for labels in (layer.in_labels, layer.out_labels):
                grp = graph.class_group[labels]
                ids = [x for x in torch.unique(grp).tolist() if x >= 0]
                if len(ids) > 1:
                    return None  # a side spanning several groups: not supported
                gid = ids[0] if ids else -1
                pos = alloc._local[labels[grp == gid]] if ids else torch.zeros(0, dtype=torch.long)
                parts.append((gid, pos, int((grp < 0).sum())))
            (a, _, _), (b, _, _) = parts
            if layer.kind == "dwconv":
                b = -1
                parts[1] = (-1, torch.zeros(0, dtype=torch.long), 0)
            if a in variable and b in variable and a != b:
                parent[find(a)] = find(b)
            plan.append((layer, parts[0], parts[1]))
        roots: dict[int, list[int]] = {}
        for g in graph.groups:
            roots.setdefault(find(g.index), []).append(g.index)
        components = list(roots.values())
        comp_of = {g: i for i, comp in enumerate(components) for g in comp}
        sizes = [int(np.prod([len(alloc.grid(graph.groups[g])) for g in comp])) for comp in components]
        if max(sizes, default=1) > alloc.BOUND_MAX_OPTIONS:
            return None
        return cls(plan, components, comp_of, variable)

    def options(self, alloc: Allocator, fixed: dict[int, int], cache: dict):
        """(values, costs) of every component's joint options at the hub widths ``fixed``."""
        groups = alloc.graph.groups
        for g in groups:
            if g.index not in cache:
                cache[g.index] = alloc._order(g, cache["scores"])
        values, costs = [], []
        for ci, comp in enumerate(self.components):
            key = ("bound", ci, tuple(fixed.get(g) for g in comp + self.outside_sorted[ci]))
            if key not in cache:
                cache[key] = self._component(alloc, ci, comp, fixed, cache)
            values.append(cache[key][0])
            costs.append(cache[key][1])
        # the layers of no group's component (no group on either side) are in alloc._const
        return values, costs

    def _component(self, alloc: Allocator, ci: int, comp: list[int], fixed: dict[int, int], cache: dict):
        groups = alloc.graph.groups
        grids = [alloc._grid_values(groups[g], fixed.get(g), cache) for g in comp]
        axis = {g: i for i, g in enumerate(comp)}
        shape = [len(grid) for grid, _ in grids]
        value = np.zeros(shape)
        for i, (_, vals) in enumerate(grids):
            value = value + vals.numpy().reshape([-1 if j == i else 1 for j in range(len(comp))])
        cost = np.zeros(shape)
        for entry in self.layers[ci]:
            cost = cost + self._layer_cost(alloc, entry, comp, axis, grids, fixed, cache)
        return value.ravel(), np.broadcast_to(cost, shape).ravel().copy()

    def _layer_cost(self, alloc: Allocator, entry, comp, axis, grids, fixed, cache) -> np.ndarray:
        """One layer's cost at every joint option of its component (broadcastable).  A layer that
        touches hubs is tabulated once over the hubs' whole grids (their candidates' widths) and
        looked up; a hub width off the grid is computed directly."""
        layer, (a, _, _), (b, _, _) = entry
        hubs = sorted({x for x in (a, b) if x in fixed})
        if hubs:
            key = ("bound-table", layer.index)
            if key not in cache:
                widths = [alloc.grid(alloc.graph.groups[h], cache[h][3]) for h in hubs]
                cache[key] = (widths, self._tabulate(alloc, entry, comp, axis, grids, dict(zip(hubs, widths)), cache))
            widths, table = cache[key]
            idx = [int(torch.searchsorted(w, fixed[h])) for h, w in zip(hubs, widths)]
            if all(i < len(w) and int(w[i]) == fixed[h] for i, w, h in zip(idx, widths, hubs)):
                return table[tuple(idx)]
        key = ("bound-layer", layer.index, fixed.get(a), fixed.get(b))
        if key not in cache:
            lead = {h: torch.tensor([fixed[h]]) for h in hubs}
            cache[key] = self._tabulate(alloc, entry, comp, axis, grids, lead, cache)[(0,) * len(hubs)]
        return cache[key]

    def _tabulate(self, alloc: Allocator, entry, comp, axis, grids, lead: dict, cache) -> np.ndarray:
        """A layer's cost over the widths ``lead`` of its hubs (leading axes, in order) and the
        joint options of its component (the other axes)."""
        layer, (a, a_pos, a_const), (b, b_pos, b_const) = entry
        cin = self._counts(alloc, a, a_pos, a_const, comp, axis, grids, lead, cache)
        cout = cin if layer.kind == "dwconv" else self._counts(alloc, b, b_pos, b_const, comp, axis, grids, lead, cache)
        cin_b, cout_b = np.broadcast_arrays(cin, cout)
        lc = alloc.cost.layer_cost(layer, torch.from_numpy(np.ascontiguousarray(cin_b).ravel()),
                                   torch.from_numpy(np.ascontiguousarray(cout_b).ravel()))
        return lc.numpy().reshape(cin_b.shape)

    def keep(self, alloc: Allocator, choice: list[int], fixed: dict[int, int], cache: dict) -> torch.Tensor:
        """The keep-mask of one joint option per component (``choice``)."""
        groups = alloc.graph.groups
        ks, idx = [None] * len(groups), [0] * len(groups)
        for comp, j in zip(self.components, choice):
            grids = [alloc._grid_values(groups[g], fixed.get(g), cache)[0] for g in comp]
            for g, grid, i in zip(comp, grids, np.unravel_index(j, [len(x) for x in grids])):
                ks[g], idx[g] = grid, int(i)
        orders = [cache[g.index][0] for g in groups]
        return alloc._keep_from(torch.tensor(idx), ks, orders, alloc._class_ranks(orders, cache))

    @staticmethod
    def _counts(alloc: Allocator, g: int, pos, const: int, comp, axis, grids, lead: dict, cache) -> np.ndarray:
        """A layer side's width over the hub widths ``lead`` (leading axes) and the component's
        joint options (broadcastable)."""
        shape = [1] * (len(lead) + len(comp))
        if g < 0:
            return np.full(shape, const, dtype=np.int64)
        if g in lead:
            grid = lead[g]
            shape[list(lead).index(g)] = -1
        elif g in axis:
            grid = grids[axis[g]][0]
            shape[len(lead) + axis[g]] = -1
        else:  # outside the component and no hub: a group with a single width (unprunable)
            grid = alloc._grid_values(alloc.graph.groups[g], None, cache)[0]
            if len(grid) != 1:
                raise SmcpError(f"bound plan: group {g} outside its layer's component has {len(grid)} widths")
        rank = cache[g][2]
        cnt = torch.searchsorted(torch.sort(rank[pos]).values, grid, right=False).numpy().astype(np.int64) + const
        return cnt.reshape(shape)
