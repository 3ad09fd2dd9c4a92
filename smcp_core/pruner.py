"""The SMCP allocation step: importance -> per-group options -> knapsack -> masks.

At each mask update every group offers the options "keep the k most important channel classes"
(k on the channel grid; frozen classes are always kept).  An option's value is the summed
importance of the kept classes; its cost is the latency (or FLOPs/params) of every layer reading
the group at the resulting input width, with each layer's output width taken from the current
masks (input-side attribution; a layer is charged to the group it reads).  A multiple-choice
knapsack picks one option per group under the budget.  Because output widths are held at their
current value while solving, the true cost of the new masks is recomputed afterwards and, if
needed, the solve is repeated with the new widths and a tightened budget until it fits.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .errors import InfeasibleTarget, SmcpError
from .graph import ChannelGraph, LayerInfo
from .knapsack import solve_mckp


class CostModel:
    """Cost of every layer of a graph as a function of its input/output widths.

    ``kind``: ``latency`` (from a :class:`~smcp_core.cost.LatencyTable`), ``flops`` (MACs) or
    ``params``.  The model-level prediction is ``scale * sum(layer costs) + offset`` where the
    calibration (``scale``, ``offset``) comes from the table's whole-model measurements.
    """

    def __init__(self, graph: ChannelGraph, kind: str = "latency", table=None) -> None:
        if kind == "latency" and table is None:
            raise SmcpError("latency cost needs a latency table: run `smcp profile` first")
        self.graph = graph
        self.kind = kind
        self.table = table
        self.unit = {"latency": "ms", "flops": "MMAC", "params": "Mparams"}[kind]
        cal = (table.model or {}).get("calibration", {}) if (table is not None and kind == "latency") else {}
        self.scale = float(cal.get("scale", 1.0))
        self.offset = float(cal.get("offset_ms", 0.0))
        self._prepare()

    def _prepare(self) -> None:
        # validate every lookup up front so a missing table entry fails before training
        if self.kind == "latency":
            for l in self.graph.layers:
                self.layer_cost(l, torch.tensor([l.sig.cin]), l.sig.cout)

    def layer_cost(self, l: LayerInfo, cin: torch.Tensor, cout: int | torch.Tensor) -> torch.Tensor:
        """Cost of layer ``l`` for a vector of input widths (for depthwise: widths) at ``cout``."""
        cin = cin.to(torch.long)
        s = l.sig
        if l.kind == "dwconv":
            cout = cin
        cout_t = cout if isinstance(cout, torch.Tensor) else torch.full_like(cin, int(cout))
        if self.kind == "latency":
            out = self.table.latency_many(s, cin, cout_t)
            out = torch.as_tensor(out, dtype=torch.float64)
            return torch.where((cin == 0) | (cout_t == 0), torch.zeros_like(out), out)
        kk = s.kernel[0] * s.kernel[1]
        cin_f, cout_f = cin.to(torch.float64), cout_t.to(torch.float64)
        if self.kind == "params":
            if l.kind == "dwconv":
                return cin_f * kk / 1e6
            return cin_f * cout_f * (kk if l.kind == "conv" else 1) / 1e6
        per = s.flops(1, 1) if l.kind != "dwconv" else s.flops(1, 1)
        if l.kind == "dwconv":
            return cin_f * float(per) / 1e6
        return cin_f * cout_f * float(per) / 1e6

    def layer_costs(self, keep: torch.Tensor) -> torch.Tensor:
        k = keep.to(torch.long).cpu()
        out = []
        for l in self.graph.layers:
            cin = k[l.in_labels].sum().view(1)
            cout = int(k[l.out_labels].sum())
            out.append(self.layer_cost(l, cin, cout)[0])
        return torch.stack(out) if out else torch.zeros(0, dtype=torch.float64)

    def total(self, keep: torch.Tensor) -> float:
        """Sum of layer costs at a keep-mask (what the knapsack budgets)."""
        return float(self.layer_costs(keep).sum())

    def predict(self, keep: torch.Tensor) -> float:
        """Predicted whole-model cost (calibrated for latency)."""
        return self.scale * self.total(keep) + self.offset

    def budget_for(self, predicted_target: float) -> float:
        """Layer-sum budget whose calibrated prediction equals ``predicted_target``."""
        return (predicted_target - self.offset) / self.scale


@dataclass
class PruneConfigLite:
    channel_round: int = 8
    min_channels: int = 8
    layer_pruning: bool = False


@dataclass
class SolveResult:
    keep: torch.Tensor
    budget: float
    cost: float  # actual layer-sum cost of ``keep``
    value: float
    iterations: int
    widths: dict[int, int]  # group index -> kept classes


class Allocator:
    """Builds the option lists and solves for masks."""

    def __init__(self, graph: ChannelGraph, cost: CostModel, cfg: PruneConfigLite) -> None:
        self.graph = graph
        self.cost = cost
        self.cfg = cfg
        self.full_keep = graph.full_keep()
        self.full_cost = cost.total(self.full_keep)
        # per group: the consumer/dw layers' input positions as class indices into the group
        self._pos: dict[int, list[tuple[LayerInfo, torch.Tensor]]] = {}
        for g in graph.groups:
            local = torch.full((graph.n_classes,), -1, dtype=torch.long)
            local[g.classes] = torch.arange(g.size)
            items = []
            for i in g.consumers + g.dw:
                l = graph.layers[i]
                items.append((l, local[l.in_labels]))
            self._pos[g.index] = items

    # ------------------------------------------------------------------
    def grid(self, g) -> torch.Tensor:
        """Allowed numbers of kept classes for group ``g``."""
        if not g.prunable:
            return torch.tensor([g.size])
        r = max(1, self.cfg.channel_round)
        lo = max(g.n_frozen, min(self.cfg.min_channels, g.size), 1)
        ks = set(range(r, g.size + 1, r)) | {g.size}
        ks = {k for k in ks if k >= lo}
        if not ks:
            ks = {g.size}
        if self.cfg.layer_pruning and g.removable and g.n_frozen == 0:
            ks.add(0)
        return torch.tensor(sorted(ks))

    def min_cost(self) -> float:
        """Smallest reachable layer-sum cost (every group at its smallest option, full widths
        elsewhere held at their minimum too)."""
        keep = self.full_keep.clone()
        for g in self.graph.groups:
            if not g.prunable:
                continue
            k = int(self.grid(g)[0])
            order = torch.argsort(g.frozen.to(torch.int8), descending=True, stable=True)
            keep[g.classes] = False
            keep[g.classes[order[:k]]] = True
        return self.cost.total(keep)

    def options(self, scores: torch.Tensor, keep_now: torch.Tensor):
        """(values, costs, ks, orders) per group for the knapsack."""
        graph, cost = self.graph, self.cost
        k_now = keep_now.to(torch.long).cpu()
        scores = scores.detach().to(torch.float64).cpu()
        values, costs, ks, orders = [], [], [], []
        for g in graph.groups:
            s = scores[g.classes].clone()
            s[g.frozen] = float("inf")
            order = torch.argsort(s, descending=True, stable=True)
            grid = self.grid(g)
            sv = scores[g.classes][order]
            sv = torch.where(torch.isinf(s[order]), torch.zeros_like(sv), sv)
            csum = torch.cat([torch.zeros(1, dtype=torch.float64), torch.cumsum(sv, 0)])
            values.append(csum[grid])
            rank = torch.empty(g.size, dtype=torch.long)
            rank[order] = torch.arange(g.size)
            c = torch.zeros(len(grid), dtype=torch.float64)
            for l, pos in self._pos[g.index]:
                r = torch.sort(rank[pos]).values
                cnt = torch.searchsorted(r, grid, right=False)  # positions with rank < k
                cout = int(k_now[l.out_labels].sum())
                c += cost.layer_cost(l, cnt, cout)
            costs.append(c)
            ks.append(grid)
            orders.append(order)
        return values, costs, ks, orders

    def _keep_from(self, choice: torch.Tensor, ks, orders) -> torch.Tensor:
        keep = self.full_keep.clone()
        for g, j, grid, order in zip(self.graph.groups, choice.tolist(), ks, orders):
            k = int(grid[j])
            keep[g.classes] = False
            keep[g.classes[order[:k]]] = True
        return keep

    def solve(self, scores: torch.Tensor, budget: float, keep_now: torch.Tensor, *, max_iter: int = 6) -> SolveResult:
        """Masks maximising kept importance with actual layer-sum cost <= budget."""
        cur = keep_now.clone().cpu()
        capacity = budget
        best: SolveResult | None = None
        it = 0
        for it in range(1, max_iter + 1):
            values, costs, ks, orders = self.options(scores, cur)
            try:
                res = solve_mckp(values, costs, capacity, unit=self.cost.unit)
            except InfeasibleTarget:
                if best is not None:
                    break
                raise InfeasibleTarget(
                    f"cost budget {budget:.4g} {self.cost.unit} is below the minimum reachable "
                    f"{self.min_cost():.4g} {self.cost.unit} (every prunable group at its smallest width); "
                    "lower the target (e.g. a smaller prune.target.speedup) or allow smaller widths "
                    "(prune.min_channels, prune.layer_pruning)"
                ) from None
            keep = self._keep_from(res.choice, ks, orders)
            actual = self.cost.total(keep)
            value = float(res.value)
            if actual <= budget * (1 + 1e-9):
                if best is None or value > best.value:
                    best = SolveResult(keep, budget, actual, value, it, self._widths(keep))
                if torch.equal(keep, cur):
                    break
                cur = keep  # re-linearise at the new output widths; may afford more
            else:
                # output widths grew relative to the linearisation point: tighten and retry
                capacity *= budget / actual
                cur = keep
        if best is None:
            raise InfeasibleTarget(
                f"could not meet the cost budget {budget:.4g} {self.cost.unit} "
                f"(minimum reachable about {self.min_cost():.4g} {self.cost.unit}); lower the target"
            )
        best.iterations = it
        return best

    def _widths(self, keep: torch.Tensor) -> dict[int, int]:
        return {g.index: int(keep[g.classes].sum()) for g in self.graph.groups}
