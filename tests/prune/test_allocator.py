"""Allocation (cost model + knapsack -> masks), budget schedule, masking gradients, importance."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from chain_support import fake_table

from smcp_core.errors import InfeasibleTarget, SmcpError
from smcp_core.graph.channel_graph import ChannelGraph
from smcp_core.models import build_model
from smcp_core.profile.cost_model import CostModel
from smcp_core.prune.allocator import Allocator, uniform_keep
from smcp_core.prune.importance import ImportanceTracker
from smcp_core.prune.masking import Masker
from smcp_core.prune.schedule import SCHEDULES, budget_at, ramp_fraction


@pytest.fixture(autouse=True, scope="module")
def _one_torch_thread(torch_single_thread):
    yield


@pytest.fixture(scope="module")
def r20():
    model = build_model("cifar/resnet20")
    return ChannelGraph(model, torch.randn(1, 3, 32, 32))


def random_scores(graph: ChannelGraph, seed: int) -> torch.Tensor:
    return torch.rand(graph.n_classes, generator=torch.Generator().manual_seed(seed))


def check_solution(graph, cost, alloc, res, budget, scores):
    keep = res.keep
    assert keep.dtype == torch.bool and keep.shape == (graph.n_classes,)
    assert bool(keep[graph.class_frozen].all()), "a frozen class was pruned"
    total = cost.total(keep)
    assert total == pytest.approx(res.cost, rel=1e-9, abs=1e-12)
    assert total <= budget * (1 + 1e-9)
    for g in graph.groups:
        k = int(keep[g.classes].sum())
        assert res.widths[g.index] == k
        if not g.prunable:
            assert k == g.size
            continue
        if k == 0:
            assert alloc.layer_pruning and g.removable, f"group {g.index} emptied without layer pruning"
            continue
        assert k % alloc.channel_round == 0 or k == g.size, (g.index, k)
        assert k >= min(alloc.min_channels, g.size), (g.index, k)
        # every layer reading or writing part of the group keeps at least min_channels of its part
        local = {c: i for i, c in enumerate(g.classes.tolist())}
        # and every layer's width is on the grid too: a part of the group a layer reads keeps a
        # multiple of channel_round (a residual stream's stages, not only their sum)
        for seg in alloc._segments[g.index]:
            kept_seg = int(keep[g.classes[seg]].sum())
            assert kept_seg >= min(alloc.min_channels, seg.numel()), (g.index, seg.tolist(), kept_seg)
            if seg.numel() % alloc.channel_round == 0:
                assert kept_seg % alloc.channel_round == 0, (g.index, seg.numel(), kept_seg)
        # beyond those reserved classes, the kept ones are the most important of their atom (the
        # classes read by the same layers; the whole group when every layer reads all of it)
        order, _, _, n_mand = alloc._order(g, scores.to(torch.float64))
        assert set(keep[g.classes].nonzero().flatten().tolist()) == set(order[:k].tolist()), g.index
        rest = order[n_mand:]
        kept_rest, dropped_rest = set(rest[: max(0, k - n_mand)].tolist()), set(rest[max(0, k - n_mand):].tolist())
        for atom in alloc._atoms[g.index]:
            kept_a = [i for i in atom.tolist() if i in kept_rest]
            dropped_a = [i for i in atom.tolist() if i in dropped_rest]
            if kept_a and dropped_a:
                assert float(scores[g.classes[kept_a]].min()) >= float(scores[g.classes[dropped_a]].max())
        del local


# --------------------------------------------------------------------------------------------------
# FLOPs cost


@pytest.mark.parametrize("layer_pruning", [False, True], ids=["no-layer-pruning", "layer-pruning"])
@pytest.mark.parametrize("rounding", [(8, 8), (4, 4)], ids=["round8", "round4"])
@pytest.mark.parametrize("frac", [0.3, 0.5, 0.7, 0.9])
def test_flops_allocation_meets_budget_and_grid(r20, frac, rounding, layer_pruning):
    graph = r20
    cost = CostModel(graph, "flops")
    alloc = Allocator(graph, cost, channel_round=rounding[0], min_channels=rounding[1], layer_pruning=layer_pruning)
    full = alloc.full_cost
    assert full == pytest.approx(graph.flops_params()[0] / 1e6)
    budget = frac * full
    scores = random_scores(graph, seed=int(frac * 10))
    res = alloc.solve(scores, budget, graph.full_keep())
    check_solution(graph, cost, alloc, res, budget, scores)
    assert res.cost < full  # something was pruned
    assert res.cost >= 0.5 * budget  # ... but not far more than needed (importance is all positive)


def test_min_cost_is_the_all_smallest_widths(r20):
    graph = r20
    cost = CostModel(graph, "flops")
    no_lp = Allocator(graph, cost, channel_round=8, min_channels=8, layer_pruning=False)
    lp = Allocator(graph, cost, channel_round=8, min_channels=8, layer_pruning=True)
    assert 0 < lp.min_cost() < no_lp.min_cost() < no_lp.full_cost
    for g in graph.groups:
        grid = no_lp.grid(g).tolist()
        if not g.prunable:
            assert grid == [g.size]
        else:
            assert grid == list(range(8, g.size + 1, 8))
            assert lp.grid(g).tolist() == ([0] if g.removable else []) + grid


def test_impossible_budget_raises_infeasible_target(r20):
    graph = r20
    cost = CostModel(graph, "flops")
    alloc = Allocator(graph, cost, channel_round=8, min_channels=8, layer_pruning=False)
    lo = alloc.min_cost()
    with pytest.raises(InfeasibleTarget) as ei:
        alloc.solve(random_scores(graph, 0), 0.01 * lo, graph.full_keep())
    assert isinstance(ei.value, SmcpError)
    msg = str(ei.value)
    assert "\n" not in msg and "minimum" in msg
    assert f"{lo:.4g}" in msg  # names the reachable minimum


def test_budget_just_above_min_cost_is_solvable_from_full_model(r20):
    graph = r20
    cost = CostModel(graph, "flops")
    alloc = Allocator(graph, cost, channel_round=8, min_channels=8, layer_pruning=False)
    budget = 1.5 * alloc.min_cost()
    scores = random_scores(graph, 0)
    res = alloc.solve(scores, budget, graph.full_keep())
    check_solution(graph, cost, alloc, res, budget, scores)


def test_min_cost_is_a_lower_bound(r20):
    graph = r20
    cost = CostModel(graph, "flops")
    alloc = Allocator(graph, cost, channel_round=8, min_channels=8, layer_pruning=False)
    with pytest.raises(InfeasibleTarget):
        alloc.solve(random_scores(graph, 0), 0.5 * alloc.min_cost(), graph.full_keep())


def test_zero_importance_still_gives_a_valid_mask(r20):
    """All-zero scores (e.g. right after an importance reset) still meet a generous budget."""
    graph = r20
    cost = CostModel(graph, "flops")
    alloc = Allocator(graph, cost, channel_round=8, min_channels=8, layer_pruning=False)
    budget = 0.7 * alloc.full_cost
    res = alloc.solve(torch.zeros(graph.n_classes), budget, graph.full_keep())
    assert res.cost <= budget and bool(res.keep[graph.class_frozen].all())


def test_high_importance_classes_are_kept(r20):
    graph = r20
    cost = CostModel(graph, "flops")
    alloc = Allocator(graph, cost, channel_round=8, min_channels=8, layer_pruning=False)
    gen = torch.Generator().manual_seed(7)
    scores = 1.0 + 0.1 * torch.rand(graph.n_classes, generator=gen)
    target = graph.groups[graph.layer("layer3.0.conv2").group]  # 64 classes
    star = target.classes[torch.randperm(target.size, generator=gen)[:16]]
    scores[target.classes] = 0.0  # worthless ...
    scores[star] = 10.0 + torch.rand(16, generator=gen)  # ... except a clear top-16
    for frac in (0.8, 0.5, 0.3):
        res = alloc.solve(scores, frac * alloc.full_cost, graph.full_keep())
        check_solution(graph, cost, alloc, res, frac * alloc.full_cost, scores)
        kept = set(target.classes[res.keep[target.classes]].tolist())
        # exactly the valuable classes: the worthless ones only cost budget
        assert kept == set(star.tolist()), frac


def test_resolve_from_current_masks_meets_tighter_budget(r20):
    """The ramp solves repeatedly from the previous masks with a falling budget."""
    graph = r20
    cost = CostModel(graph, "flops")
    alloc = Allocator(graph, cost, channel_round=4, min_channels=4, layer_pruning=True)
    full = alloc.full_cost
    keep = graph.full_keep()
    prev = full
    for i, frac in enumerate((0.9, 0.75, 0.6, 0.45, 0.3)):
        scores = random_scores(graph, 100 + i)
        res = alloc.solve(scores, frac * full, keep)
        check_solution(graph, cost, alloc, res, frac * full, scores)
        keep = res.keep
        assert res.cost <= prev * (1 + 1e-9) or res.cost <= frac * full
        prev = res.cost


# --------------------------------------------------------------------------------------------------
# latency cost




@pytest.mark.parametrize("frac", [0.4, 0.6, 0.8])
def test_latency_allocation_meets_budget(r20, frac):
    graph = r20
    table = fake_table(graph)
    cost = CostModel(graph, "latency", table)
    assert cost.unit == "ms" and cost.scale == 1.25 and cost.offset == 0.1
    full_keep = graph.full_keep()
    assert cost.predict(full_keep) == pytest.approx(1.25 * cost.total(full_keep) + 0.1)
    assert cost.budget_for(cost.predict(full_keep)) == pytest.approx(cost.total(full_keep))
    alloc = Allocator(graph, cost, channel_round=8, min_channels=8, layer_pruning=True)
    budget = frac * alloc.full_cost
    scores = random_scores(graph, 3)
    res = alloc.solve(scores, budget, full_keep)
    check_solution(graph, cost, alloc, res, budget, scores)
    # every per-layer cost is the table's value at the layer's widths (0 for a removed layer)
    for l, (cin, cout), c in zip(graph.layers, graph.widths(res.keep), cost.layer_costs(res.keep).tolist()):
        expect = 0.0 if cin == 0 or cout == 0 else table.latency(l.sig, cin, cout)
        assert c == pytest.approx(expect, rel=1e-9, abs=1e-12)


def test_latency_cost_needs_a_table(r20):
    with pytest.raises(SmcpError, match="smcp profile"):
        CostModel(r20, "latency")


def test_latency_allocation_with_a_measured_table(r20):
    pytest.importorskip("onnxruntime")
    from smcp_core.profile.measure import measure_table

    graph = r20
    table = measure_table([l.sig for l in graph.layers], backend="onnxruntime", channel_step=8, threads=1,
                          warmup=1, min_runs=3, max_runs=3)
    assert table.complete
    cost = CostModel(graph, "latency", table)
    alloc = Allocator(graph, cost, channel_round=8, min_channels=8, layer_pruning=False)
    # a measured table is noisy: place the budgets between the reachable minimum and the full cost
    lo = alloc.min_cost()
    assert 0 < lo < alloc.full_cost
    for frac in (0.3, 0.7):
        budget = lo + frac * (alloc.full_cost - lo)
        scores = random_scores(graph, 9)
        res = alloc.solve(scores, budget, graph.full_keep())
        check_solution(graph, cost, alloc, res, budget, scores)


# --------------------------------------------------------------------------------------------------
# budget schedule


@pytest.mark.parametrize("kind", SCHEDULES)
def test_budget_schedule_endpoints_and_monotone(kind):
    full, target = 40.0, 12.5
    assert budget_at(0.0, full, target, kind) == pytest.approx(full)
    assert budget_at(1.0, full, target, kind) == target  # exactly
    assert budget_at(-0.5, full, target, kind) == pytest.approx(full)
    assert budget_at(1.7, full, target, kind) == target
    vals = [budget_at(i / 200, full, target, kind) for i in range(201)]
    assert all(b <= a + 1e-12 for a, b in zip(vals, vals[1:]))
    assert all(target - 1e-12 <= v <= full + 1e-12 for v in vals)
    assert vals[100] < full and vals[100] > target  # strictly inside at mid-ramp


def test_budget_schedule_shapes():
    full, target = 100.0, 25.0
    assert budget_at(0.5, full, target, "linear") == pytest.approx(62.5)
    assert budget_at(0.5, full, target, "geometric") == pytest.approx(50.0)  # sqrt(100 * 25)
    # exp front-loads the reduction
    assert budget_at(0.25, full, target, "exp") < budget_at(0.25, full, target, "linear")
    assert ramp_fraction(0.0, "exp") == pytest.approx(0.0) and ramp_fraction(1.0, "exp") == pytest.approx(1.0)
    with pytest.raises(ValueError, match="unknown schedule"):
        budget_at(0.5, full, target, "cosine")


# --------------------------------------------------------------------------------------------------
# masks: soft vs hard gradients, pruned decay


class Tiny(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(8)
        self.conv2 = nn.Conv2d(8, 12, 3, padding=1, bias=True)
        self.bn2 = nn.BatchNorm2d(12)
        self.fc = nn.Linear(12, 5)

    def forward(self, x):
        x = F.relu(self.bn1(self.conv1(x)))
        x = F.relu(self.bn2(self.conv2(x)))
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))


@pytest.fixture
def tiny():
    torch.manual_seed(0)
    model = Tiny().eval()
    with torch.no_grad():
        for bn in (model.bn1, model.bn2):
            bn.running_mean.uniform_(-0.5, 0.5)
            bn.running_var.uniform_(0.5, 1.5)
            bn.bias.uniform_(-0.5, 0.5)
    graph = ChannelGraph(model, torch.randn(1, 3, 8, 8))
    keep = graph.full_keep()
    keep[graph.layer("conv2").in_labels[[1, 4, 6]]] = False  # 3 of conv1's 8 outputs
    keep[graph.layer("fc").in_labels[[0, 5]]] = False  # 2 of conv2's 12 outputs
    x = torch.randn(4, 3, 8, 8, generator=torch.Generator().manual_seed(1))
    return model, graph, keep, x


def _effective_grads(model, graph, keep, x):
    """Gradients w.r.t. the *effective* weights W*m, from a plain copy with the masks baked in."""
    ref = copy.deepcopy(model)
    mods = dict(ref.named_modules())
    with torch.no_grad():
        for l in graph.consumers:
            w = mods[l.name].weight
            m = keep[l.in_labels].to(w.dtype).view([1, -1] + [1] * (w.dim() - 2))
            w.mul_(m)
    out = ref(x)
    out.square().sum().backward()
    return out.detach(), {l.name: mods[l.name].weight.grad.clone() for l in graph.consumers}


@pytest.mark.parametrize("mode", ["soft", "hard"])
def test_mask_gradients(tiny, mode):
    model, graph, keep, x = tiny
    y_ref, g_eff = _effective_grads(model, graph, keep, x)
    mk = Masker(model, graph, mode=mode)
    mk.set_keep(keep)
    assert torch.equal(mk.keep(), keep)
    out = model(x)
    assert torch.allclose(out, y_ref, atol=1e-6)  # the forward uses W * m in both modes
    out.square().sum().backward()
    mods = dict(model.named_modules())
    for l in graph.consumers:
        w = Masker.dense_weight(mods[l.name])
        m = keep[l.in_labels].view([1, -1] + [1] * (w.dim() - 2)).expand_as(w)
        if mode == "soft":
            assert torch.allclose(w.grad, g_eff[l.name], atol=1e-6)  # straight-through
            if not bool(m.all()):
                assert float(w.grad[~m].abs().max()) > 0  # masked weights keep learning
        else:
            assert torch.allclose(w.grad, g_eff[l.name] * m, atol=1e-6)
            assert bool((w.grad[~m] == 0).all())
        assert float(w.grad[m].abs().max()) > 0
    # the dense weights themselves are untouched by masking
    mk.remove(bake=False)
    assert not any(".parametrizations." in k for k in model.state_dict())


def test_pruned_decay_only_on_masked_input_channels(tiny):
    model, graph, keep, x = tiny
    mk = Masker(model, graph, mode="soft")
    mk.set_keep(keep)
    model(x).square().sum().backward()
    before = [w.grad.clone() for w, _, _, _ in mk.weights_and_grads()]
    mk.apply_pruned_decay(0.0)  # no-op
    assert all(torch.equal(b, w.grad) for b, (w, _, _, _) in zip(before, mk.weights_and_grads()))
    lam = 0.3
    mk.apply_pruned_decay(lam)
    n_masked = 0
    for b, (w, g, lin, _) in zip(before, mk.weights_and_grads()):
        m = keep[lin].view([1, -1] + [1] * (w.dim() - 2)).expand_as(w)
        delta = g - b
        assert torch.allclose(delta, lam * (~m).to(w.dtype) * w.detach(), atol=1e-7)
        assert bool((delta[m] == 0).all())
        n_masked += int((~m).any())
    assert n_masked == 2  # conv2 and fc read masked classes


def test_bake_applies_masks(tiny):
    model, graph, keep, x = tiny
    y_ref, _ = _effective_grads(model, graph, keep, x)
    mk = Masker(model, graph)
    mk.set_keep(keep)
    mk.remove(bake=True)
    with torch.no_grad():
        assert torch.allclose(model(x), y_ref, atol=1e-6)
    w = model.conv2.weight
    assert bool((w[:, [1, 4, 6]] == 0).all()) and float(w.detach()[:, [0, 2]].abs().min()) > 0


# --------------------------------------------------------------------------------------------------
# importance


def _backward(model, x):
    for p in model.parameters():
        p.grad = None
    model(x).square().sum().backward()


def test_taylor_importance_zero_for_zero_weights(tiny):
    model, graph, keep, x = tiny
    conv2 = graph.layer("conv2")
    dead = int(conv2.in_labels[2])  # a class read by conv2 only
    with torch.no_grad():
        model.conv2.weight[:, 2] = 0
    mk = Masker(model, graph, mode="soft")
    mk.set_keep(keep)
    tr = ImportanceTracker(mk, kind="taylor", accumulate="latest")
    _backward(model, x)
    tr.update()
    s = tr.scores()
    assert s[dead] == 0
    grp = graph.groups[conv2.group]
    others = [c for c in grp.classes.tolist() if c != dead]
    assert bool((s[others] > 0).all())  # masked classes (1, 4, 6) are scored too
    assert bool((s >= 0).all())


def test_weight_importance_matches_formula(tiny):
    model, graph, keep, x = tiny
    mk = Masker(model, graph)
    tr = ImportanceTracker(mk, kind="weight", accumulate="latest")
    tr.update()
    w = model.conv2.parametrizations.weight.original.detach()
    per_in = w.abs().sum(dim=(2, 3)).sum(0)
    lab = graph.layer("conv2").in_labels
    assert torch.allclose(tr.scores()[lab], per_in, rtol=1e-5)


@pytest.mark.parametrize("accumulate", ["latest", "momentum", "average"])
def test_importance_accumulation(tiny, accumulate):
    model, graph, keep, _ = tiny
    mk = Masker(model, graph, mode="soft")
    mk.set_keep(keep)
    tr = ImportanceTracker(mk, kind="taylor", accumulate=accumulate, momentum=0.75)
    gen = torch.Generator().manual_seed(5)
    steps = []
    for _ in range(3):
        _backward(model, torch.randn(4, 3, 8, 8, generator=gen))
        s = tr.step_scores().clone()
        assert torch.equal(tr.step_scores(), s)  # pure: no state change
        steps.append(s)
        tr.update()
    s1, s2, s3 = steps
    assert not torch.allclose(s1, s2)
    if accumulate == "latest":
        expect = s3
    elif accumulate == "momentum":
        expect = 0.75 * (0.75 * s1 + 0.25 * s2) + 0.25 * s3  # first update copies
    else:
        expect = (s1 + s2 + s3) / 3
    assert torch.allclose(tr.scores(), expect, rtol=1e-5, atol=1e-8)
    assert tr.count == 3
    st = copy.deepcopy(tr.state_dict())
    tr.reset()
    assert tr.count == 0 and float(tr.acc.abs().sum()) == 0
    # with no step since the reset, scores() falls back to the previous window (never all zero)
    assert torch.allclose(tr.scores(), expect, rtol=1e-5, atol=1e-8)
    tr.update()
    assert tr.count == 1 and tr.scores() is tr.acc  # a new window has started
    tr.load_state_dict(st)
    assert torch.allclose(tr.scores(), expect, rtol=1e-5, atol=1e-8) and tr.count == 3


def test_importance_tracker_rejects_unknown_kinds(tiny):
    model, graph, _, _ = tiny
    mk = Masker(model, graph)
    with pytest.raises(ValueError):
        ImportanceTracker(mk, kind="hessian")
    with pytest.raises(ValueError):
        ImportanceTracker(mk, accumulate="max")


def test_importance_state_dict_is_a_snapshot(tiny):
    model, graph, keep, x = tiny
    mk = Masker(model, graph, mode="soft")
    mk.set_keep(keep)
    tr = ImportanceTracker(mk, kind="taylor", accumulate="latest")
    _backward(model, x)
    tr.update()
    st = tr.state_dict()
    saved = st["acc"].clone()
    tr.reset()
    assert torch.equal(st["acc"], saved)


def test_stickiness_keeps_masks_unless_the_gain_is_clear(r20):
    """prune.stickiness: currently kept classes count (1 + s) x their importance when re-solving."""
    graph = r20
    cost = CostModel(graph, "flops")
    budget = 0.5 * cost.total(graph.full_keep())
    scores = random_scores(graph, 3)
    round4 = dict(channel_round=4, min_channels=4, layer_pruning=False)
    first = Allocator(graph, cost, **round4).solve(scores, budget, graph.full_keep()).keep
    # importance drifts against the current masks: kept classes lose 20 %, pruned ones gain 25 %
    noisy = scores * torch.where(first, torch.tensor(0.8), torch.tensor(1.25))
    plain = Allocator(graph, cost, **round4).solve(noisy, budget, first)
    sticky = Allocator(graph, cost, **round4, stickiness=1.0).solve(noisy, budget, first)
    dropped_plain = int((first & ~plain.keep).sum())  # kept before, pruned now
    dropped_sticky = int((first & ~sticky.keep).sum())
    assert dropped_plain > 0  # without hysteresis the drift swaps channels out
    assert dropped_sticky < dropped_plain
    assert sticky.cost <= budget * (1 + 1e-9)


def test_removed_group_keeps_the_score_that_removed_it():
    """A group emptied by layer pruning keeps its pre-removal score: its live Taylor estimate runs
    through a batch norm normalising an all-zero signal and is inflated by ~1/sqrt(eps)."""
    gen = torch.Generator().manual_seed(0)
    model = build_model("cifar/resnet20").train()
    graph = ChannelGraph(model, torch.randn(1, 3, 32, 32))
    mk = Masker(model, graph, mode="soft")
    tr = ImportanceTracker(mk, kind="taylor", accumulate="average")
    x, y = torch.randn(16, 3, 32, 32, generator=gen), torch.randint(0, 10, (16,), generator=gen)

    def step():
        model.zero_grad(set_to_none=True)
        F.cross_entropy(model(x), y).backward()
        tr.update()

    step()
    before = tr.scores().clone()
    g = next(g for g in graph.groups if g.removable)
    keep = graph.full_keep()
    keep[g.classes] = False
    mk.set_keep(keep)
    tr.reset()
    step()
    raw = tr.step_scores()
    # the live estimate of the removed block's channels explodes ...
    assert float(raw[g.classes].mean()) > 20 * float(before[g.classes].mean())
    # ... and is not used: the scores that removed the group are held
    assert torch.equal(tr.scores()[g.classes], before[g.classes])
    others = torch.ones(graph.n_classes, dtype=torch.bool)
    others[g.classes] = False
    assert not torch.allclose(tr.scores()[others], before[others])  # everything else is live
    # the hold survives a checkpoint round trip
    st = copy.deepcopy(tr.state_dict())
    tr2 = ImportanceTracker(mk, kind="taylor", accumulate="average")
    tr2.load_state_dict(st)
    assert torch.equal(tr2.held, tr.held) and torch.equal(tr2.removed, tr.removed)
    # once the group is back its score is live again
    mk.set_keep(graph.full_keep())
    tr.reset()
    step()
    assert not bool(tr.removed.any())
    assert torch.equal(tr.scores(), tr.step_scores())


class _Chain(nn.Module):
    """conv1 -> bn -> relu -> conv2 -> bn -> relu -> conv3 -> pool -> fc: ordinary groups only."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 16, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(16)
        self.conv2 = nn.Conv2d(16, 24, 3, padding=1)
        self.bn2 = nn.BatchNorm2d(24)
        self.conv3 = nn.Conv2d(24, 32, 3, padding=1)
        self.fc = nn.Linear(32, 10)

    def forward(self, x):
        x = F.relu(self.bn1(self.conv1(x)))
        x = F.relu(self.bn2(self.conv2(x)))
        return self.fc(F.adaptive_avg_pool2d(self.conv3(x), 1).flatten(1))


@pytest.mark.parametrize("w", [1.0, 0.5, 0.0])
def test_cost_weight_splits_layer_cost_between_input_and_output_groups(w):
    graph = ChannelGraph(_Chain(), torch.randn(1, 3, 8, 8))
    cost = CostModel(graph, "flops")
    alloc = Allocator(graph, cost, channel_round=4, min_channels=4, layer_pruning=False, cost_weight=w)
    keep = graph.full_keep()
    g24 = graph.groups[graph.layer("conv3").group]  # conv2's outputs = conv3's inputs
    assert g24.size == 24 and g24.prunable
    keep[g24.classes[20:]] = False  # current width 20
    g32 = graph.groups[graph.layer("fc").group]
    keep[g32.classes[28:]] = False  # current width 28
    values, costs, ks, _ = alloc.options(torch.rand(graph.n_classes), keep)
    conv2, conv3 = graph.layer("conv2"), graph.layer("conv3")
    k = ks[g24.index]
    # conv3 reads the group (output held at 28); conv2 writes it (input held at 16: conv1's group)
    reads = cost.layer_cost(conv3, k, 28)
    writes = cost.layer_cost(conv2, torch.full_like(k, 16), k)
    expect = w * reads + (1 - w) * writes
    # the fc layer (reads g32) is no part of g24's options; conv3's write side lands in g32's
    assert torch.allclose(costs[g24.index], expect, rtol=1e-9)
    k32 = ks[g32.index]
    fc_reads = cost.layer_cost(graph.layer("fc"), k32, 10)
    conv3_writes = cost.layer_cost(conv3, torch.full_like(k32, 20), k32)
    assert torch.allclose(costs[g32.index], fc_reads + (1 - w) * conv3_writes, rtol=1e-9)
    # and the solver still meets a budget exactly by the true cost
    budget = 0.6 * cost.total(graph.full_keep())
    res = alloc.solve(torch.rand(graph.n_classes, generator=torch.Generator().manual_seed(1)), budget,
                      graph.full_keep())
    assert cost.total(res.keep) <= budget * (1 + 1e-9)


def test_cost_weight_out_of_range_is_an_error(r20):
    with pytest.raises(SmcpError, match="cost_weight"):
        Allocator(r20, CostModel(r20, "flops"), channel_round=4, min_channels=4, layer_pruning=False, cost_weight=1.5)


@pytest.mark.parametrize("mode", ["hard", "permanent"])
def test_permanent_masks_zero_the_pruned_weights(tiny, mode):
    model, graph, keep, x = tiny
    model = copy.deepcopy(model)
    before = model.conv2.weight.detach().clone()
    mk = Masker(model, graph, mode=mode)
    mk.set_keep(keep)
    _backward(model, x)
    w = Masker.dense_weight(model.conv2)
    assert bool((w.grad[:, [1, 4, 6]] == 0).all())  # both mask the gradient
    mk.set_keep(graph.full_keep())  # the channels come back ...
    dense = w.detach()
    assert torch.equal(dense[:, [0, 2, 3, 5, 7]], before[:, [0, 2, 3, 5, 7]])
    if mode == "permanent":  # ... from zero
        assert bool((dense[:, [1, 4, 6]] == 0).all())
    else:  # ... with their old values
        assert torch.equal(dense[:, [1, 4, 6]], before[:, [1, 4, 6]])


def test_bn_taylor_importance_matches_formula(tiny):
    """HALP's criterion: (gamma dL/dgamma + beta dL/dbeta)^2 of the BN after each producer conv."""
    model, graph, keep, x = tiny
    model = copy.deepcopy(model).train()
    mk = Masker(model, graph, mode="soft")
    tr = ImportanceTracker(mk, kind="bn_taylor", accumulate="latest")
    _backward(model, x)
    tr.update()
    s = tr.scores()
    for conv, bn in (("conv1", model.bn1), ("conv2", model.bn2)):
        expect = (bn.weight * bn.weight.grad + bn.bias * bn.bias.grad).detach().square()
        lab = graph.layer(conv).out_labels
        assert torch.allclose(s[lab], expect, rtol=1e-5, atol=1e-12), conv
    assert float(s.abs().sum()) > 0


def test_removed_layer_costs_the_fitted_residual(r20):
    """A layer removed by layer pruning costs the calibration's removed_layer_ms (the residual join it
    leaves behind), in the knapsack's options and in the model's total alike."""
    graph = r20
    table = fake_table(graph)
    table.model["calibration"]["removed_layer_ms"] = 0.004
    cost = CostModel(graph, "latency", table)
    alloc = Allocator(graph, cost, channel_round=8, min_channels=8, layer_pruning=True)
    scores = random_scores(graph, 5)
    res = alloc.solve(scores, 0.35 * alloc.full_cost, graph.full_keep())
    widths = graph.widths(res.keep)
    removed = [i for i, (ci, co) in enumerate(widths) if ci == 0 or co == 0]
    assert removed, "the budget should remove at least one block"
    lc = cost.layer_costs(res.keep)
    for i, (l, (ci, co)) in enumerate(zip(graph.layers, widths)):
        expect = 0.004 if i in removed else table.latency(l.sig, ci, co)
        assert float(lc[i]) == pytest.approx(expect, rel=1e-9)
    assert res.cost == pytest.approx(float(lc.sum())) and res.cost <= 0.35 * alloc.full_cost * (1 + 1e-9)
    # the same solve without the residual would remove as much or more: removal is dearer now
    free = CostModel(graph, "latency", fake_table(graph))
    res0 = Allocator(graph, free, channel_round=8, min_channels=8, layer_pruning=True).solve(
        scores, 0.35 * alloc.full_cost, graph.full_keep())
    assert len(removed) <= sum(1 for ci, co in graph.widths(res0.keep) if ci == 0 or co == 0)


def test_fit_calibration_recovers_scale_and_removed_layer_cost():
    from smcp_core.profile.calibration import fit_calibration

    pts = [(s, n, 1.3 * (s + 0.01 * n)) for s, n in ((2.0, 0), (1.5, 0), (1.0, 0), (1.6, 18), (1.2, 18))]
    scale, removed = fit_calibration(pts)
    assert scale == pytest.approx(1.3) and removed == pytest.approx(0.01)
    # no removal point: proportional fit, no residual
    scale, removed = fit_calibration([(2.0, 0, 2.4), (1.0, 0, 1.2)])
    assert scale == pytest.approx(1.2) and removed == 0.0
    # removal measured *faster* than its layer sum suggests: a negative residual is never used
    scale, removed = fit_calibration([(2.0, 0, 2.0), (1.0, 0, 1.0), (1.5, 10, 1.2)])
    assert removed == 0.0 and scale > 0


class _UnreadDepthwise(nn.Module):
    """conv -> depthwise conv -> global mean as the output: the depthwise conv's channels are read by
    no conv/linear layer, so it belongs to no channel group (graph group -1)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.mid = nn.Conv2d(8, 16, 1)
        self.dw = nn.Conv2d(16, 16, 3, padding=1, groups=16)

    def forward(self, x):
        return self.dw(self.mid(self.conv(x).relu())).mean((2, 3))


def test_a_channelwise_conv_in_no_group_is_a_constant_cost_not_an_index_error():
    graph = ChannelGraph(_UnreadDepthwise(), torch.randn(1, 3, 16, 16))
    dw = graph.layer("dw")
    assert dw.group == -1  # what once made Allocator.__init__ raise KeyError: -1
    cost = CostModel(graph, "flops")
    alloc = Allocator(graph, cost, channel_round=1, min_channels=1, layer_pruning=False)
    res = alloc.solve(random_scores(graph, seed=0), 0.7 * alloc.full_cost, graph.full_keep())
    assert res.cost <= 0.7 * alloc.full_cost
    assert bool(res.keep[dw.in_labels].all())  # never pruned: nothing masks it
    assert not bool(res.keep.all())  # the conv -> mid group was pruned


def test_a_conv_without_a_group_is_one_clear_line():
    graph = ChannelGraph(_UnreadDepthwise(), torch.randn(1, 3, 16, 16))
    graph.layer("mid").group = -1  # a future gap in the graph analysis
    with pytest.raises(SmcpError, match=r"layer mid \(conv\) belongs to no channel group"):
        Allocator(graph, CostModel(graph, "flops"), channel_round=1, min_channels=1, layer_pruning=False)


# --------------------------------------------------------------------------------------------------
# the optimised solver gives the masks the original (per-channel, uncached) code gave

# sha256[:16] of the keep-mask (uint8 bytes) solved from the full model and then re-solved from that
# answer, recorded with the allocator and knapsack as they were before the bookkeeping was optimised
# (issue 15): ResNet-50 at rn50_fps2x's grid (channel_round = min_channels = 32, a 32-step table),
# CIFAR ResNet-20 at 8 (its entries re-recorded when the residual stream came to be kept in units of
# channel_round per stage, so each stage's width stays on the grid; ResNet-50's streams are one atom each)
EXPECTED_KEEP = {
    ("torchvision/resnet50", "latency", 0, 0.5): ("819cc4b1e650fc98", "75e338a0211aab4f"),
    ("torchvision/resnet50", "latency", 1, 0.7): ("0ac0ee048f84ea82", "05893867573e02d6"),
    ("torchvision/resnet50", "latency", 2, 0.35): ("bdbee2dd93e53167", "c994583a18b32911"),
    ("cifar/resnet20", "latency", 0, 0.5): ("0455dd022496bcc0", "f2802743f18b49a0"),
    ("cifar/resnet20", "latency", 1, 0.7): ("62f14bc30cc24f30", "0c44f7eb8afb61f1"),
    ("cifar/resnet20", "latency", 2, 0.4): ("d901c24440ca9e14", "6a7ea441aba5c0fe"),
    ("cifar/resnet20", "flops", 0, 0.5): ("21421f31d5268173", "da636509bb909993"),
    ("cifar/resnet20", "flops", 1, 0.7): ("0480d0a211e12831", "937ced5b11161404"),
    ("cifar/resnet20", "flops", 2, 0.4): ("714d95ed21a649d7", "3edd29626ea357d5"),
}
GRID = {"torchvision/resnet50": (224, 32), "cifar/resnet20": (32, 8)}


def _digest(keep: torch.Tensor) -> str:
    import hashlib

    return hashlib.sha256(keep.to(torch.uint8).numpy().tobytes()).hexdigest()[:16]


@pytest.mark.parametrize("name", list(GRID))
def test_solutions_equal_the_unoptimised_solvers(name, monkeypatch):
    """The linearised solve (kept for graphs the exact component solve does not cover) still gives
    the recorded masks, with the hub search skipping candidates by their bounds."""
    monkeypatch.setattr(Allocator, "EXACT_COMPONENTS", False)
    hw, step = GRID[name]
    graph = ChannelGraph(build_model(name), torch.randn(1, 3, hw, hw))
    for kind in ("latency", "flops"):
        cases = [(s, f) for (n, k, s, f) in EXPECTED_KEEP if n == name and k == kind]
        if not cases:
            continue
        cost = CostModel(graph, kind, fake_table(graph, step) if kind == "latency" else None)
        alloc = Allocator(graph, cost, channel_round=step, min_channels=step)
        for seed, frac in cases:
            s = torch.rand(graph.n_classes, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
            first = alloc.solve(s, frac * alloc.full_cost, graph.full_keep())
            again = alloc.solve(s * 0.9 + 0.05, (frac - 0.05) * alloc.full_cost, first.keep)
            assert (_digest(first.keep), _digest(again.keep)) == EXPECTED_KEEP[(name, kind, seed, frac)], (kind, seed)
            assert first.cost == cost.total(first.keep) and again.cost == cost.total(again.keep)


@pytest.mark.parametrize("name", list(GRID))
def test_exact_component_solve_is_no_worse_than_the_linearised_one(name, monkeypatch):
    """Each hub candidate solved exactly over components (true costs) instead of linearised: on
    ResNet-50 (rn50_fps2x grid) and ResNet-20, random scores, from the full model and re-solved,
    the kept importance is at least the linearised solve's, and the true cost meets the budget."""
    hw, step = GRID[name]
    graph = ChannelGraph(build_model(name), torch.randn(1, 3, hw, hw))
    for kind in ("latency", "flops"):
        cost = CostModel(graph, kind, fake_table(graph, step) if kind == "latency" else None)
        alloc = Allocator(graph, cost, channel_round=step, min_channels=step)
        assert alloc._bound_plan is not None
        for seed, frac in ((0, 0.5), (1, 0.7), (2, 0.45), (3, 0.6)):
            s = torch.rand(graph.n_classes, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
            out = {}
            for exact in (False, True):
                monkeypatch.setattr(Allocator, "EXACT_COMPONENTS", exact)
                first = alloc.solve(s, frac * alloc.full_cost, graph.full_keep())
                again = alloc.solve(s * 0.9 + 0.05, (frac - 0.05) * alloc.full_cost, first.keep)
                out[exact] = (first, again)
            for old, new, budget, sc in zip(out[False], out[True], (frac, frac - 0.05), (s, s * 0.9 + 0.05)):
                assert new.value >= old.value * (1 - 1e-12), (kind, seed, frac)
                assert new.cost == cost.total(new.keep) <= budget * alloc.full_cost * (1 + 1e-9)
                check_solution(graph, cost, alloc, new, budget * alloc.full_cost, sc)


@pytest.mark.parametrize("name", list(GRID))
def test_hub_candidate_bounds_are_above_the_solved_values(name):
    """The hub search skips a candidate width when an upper bound on its value (an exact knapsack
    over groups joined by layers, relaxed) is below the best value found: the bound must be above
    every candidate's solved value, whatever the other hubs' widths."""
    hw, step = GRID[name]
    graph = ChannelGraph(build_model(name), torch.randn(1, 3, hw, hw))
    for kind in ("latency", "flops"):
        cost = CostModel(graph, kind, fake_table(graph, step) if kind == "latency" else None)
        alloc = Allocator(graph, cost, channel_round=step, min_channels=step)
        assert alloc._bound_plan is not None and alloc.hubs
        s = torch.rand(graph.n_classes, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
        budget = 0.5 * alloc.full_cost
        cache, state, cur, n = {"scores": s}, {"n": 0}, graph.full_keep(), 0
        for h in alloc.hubs:
            g = graph.groups[h]
            cache.setdefault(h, alloc._order(g, s))
            order, n_mand = cache[h][0], cache[h][3]
            best = None
            for k in alloc._hub_candidates(g, int(cur[g.classes].sum()), n_mand):
                lin = alloc._set_width(cur, g, k, order)
                fixed = {x: int(lin[graph.groups[x].classes].sum()) for x in alloc.hubs}
                r = alloc._solve_at(s, budget, lin, fixed, cache, 3, state)
                ub = alloc._candidate_bound(fixed, budget, cache)
                if r is not None:
                    assert r.value <= ub + 1e-9 * abs(ub), (kind, h, k)
                    best = r if best is None or r.value > best.value else best
                    n += 1
            cur = cur if best is None else best.keep
        assert n > 0


# --------------------------------------------------------------------------------------------------
# data parallel: the mask update is solved on rank 0 only and its result (or error) broadcast


def _solve_on_main_worker(rank: int, world: int, port: int, tmp: str) -> None:
    import os

    import torch.distributed as dist

    from smcp_core.prune.allocator import SolveResult
    from smcp_core.prune.pruner import _solve_on_main

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        calls = []

        def solve(scores, budget):
            calls.append(rank)
            if budget < 0:
                raise InfeasibleTarget("cost budget -1 is below the minimum reachable 0.5")
            return SolveResult(torch.tensor([True, rank == 0]), budget, 1.0, 2.0, 1, {0: 1 + rank})

        res = _solve_on_main(solve, torch.zeros(2), 1.0)
        try:
            _solve_on_main(solve, torch.zeros(2), -1.0)
            err = ""
        except InfeasibleTarget as exc:
            err = str(exc)
        torch.save({"keep": res.keep, "widths": res.widths, "calls": calls, "err": err}, f"{tmp}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_a_mask_update_is_solved_on_rank_0_and_broadcast_with_its_error(tmp_path):
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_solve_on_main_worker, args=(2, port, str(tmp_path)), nprocs=2, join=True)
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in (0, 1))
    assert r0["calls"] == [0, 0] and r1["calls"] == []  # rank 1 never solves
    assert torch.equal(r0["keep"], torch.tensor([True, True])) and torch.equal(r1["keep"], r0["keep"])
    assert r1["widths"] == {0: 1}
    assert r0["err"] == r1["err"] == "cost budget -1 is below the minimum reachable 0.5"


def test_monotone_solve_from_off_grid_stream_widths_keeps_a_subset(r20):
    """A monotone re-solve from masks whose residual-stream stages are off the channel grid (masks
    from before the stream was kept in units, or from outside): the result still keeps only
    currently kept classes (a unit mixing kept and pruned classes once sorted last as a whole)."""
    graph = r20
    alloc = Allocator(graph, CostModel(graph, "flops"), channel_round=4, min_channels=4)
    stream = max(graph.groups, key=lambda g: g.size)
    assert len(alloc._atoms[stream.index]) == 3
    keep_now = graph.full_keep().clone()
    for atom, drop in zip(alloc._atoms[stream.index], (9, 5, 10)):  # 23 / 11 / 6 kept: off the grid of 4
        keep_now[stream.classes[atom[:drop]]] = False
    scores = random_scores(graph, seed=3)
    res = alloc.solve(scores, 0.5 * alloc.full_cost, keep_now, monotone=True)
    assert not bool((res.keep & ~keep_now).any()), "a pruned class came back in a monotone solve"
    assert res.cost <= 0.5 * alloc.full_cost * (1 + 1e-9)


def test_unit_order_keeps_the_most_valuable_units_at_every_width(r20):
    """Across the residual stream's atoms, each grid width of the unit order keeps the most
    valuable choice of units (brute force over how many units each atom keeps, its mandatory units
    included)."""
    import itertools

    graph = r20
    r = 4
    alloc = Allocator(graph, CostModel(graph, "flops"), channel_round=r, min_channels=r)
    stream = max(graph.groups, key=lambda g: g.size)
    atoms = alloc._atoms[stream.index]
    for seed in range(5):
        scores = random_scores(graph, seed).to(torch.float64)
        order, csum, _, n_mand = alloc._order(stream, scores)
        s = scores[stream.classes]
        atom_of = torch.empty(stream.size, dtype=torch.long)
        for a, pos in enumerate(atoms):
            atom_of[pos] = a
        mand = [int((atom_of[order[:n_mand]] == a).sum()) // r for a in range(len(atoms))]
        sorted_s = [torch.sort(s[pos], descending=True).values for pos in atoms]
        for k in range(n_mand, stream.size + 1, r):
            best = max(sum(float(v[: c * r].sum()) for v, c in zip(sorted_s, cs))
                       for cs in itertools.product(*(range(len(pos) // r + 1) for pos in atoms))
                       if sum(cs) * r == k and all(c >= m for c, m in zip(cs, mand)))
            assert float(csum[k]) == pytest.approx(best, rel=1e-12), (seed, k)


@pytest.mark.parametrize("frac, step", [(0.75, 4), (0.5, 4), (0.6, 8), (0.75, 16), (0.5, 16), (0.9, 16), (1.0, 16)])
def test_uniform_keep_thins_every_layer_alike_on_the_grid(r20, frac, step):
    """The calibration's uniformly thinned models: every conv/linear layer keeps the grid width
    nearest ``frac`` of its own width, the residual stream's three stages alike (16/32/64 at 0.5:
    8/16/32, or 16/16/32 on a grid of 16; a group-wide fraction of the stream's 64 classes kept
    stage 1 and 2 whole)."""
    keep = uniform_keep(r20, frac, step)
    for layer, (ci, co) in zip(r20.layers, r20.widths(keep)):
        for full, kept in ((layer.sig.cin, ci), (layer.sig.cout, co)):
            if full in (1, 3, 10):  # the image's channels and the classes are never pruned
                assert kept == full
                continue
            grid = sorted(set(range(step, full + 1, step)) | {full})
            want = min(grid, key=lambda k: (abs(k - frac * full), k))
            assert kept == want, (layer.name, full, kept, want)
    if frac == 1.0:
        assert bool(keep.all())
